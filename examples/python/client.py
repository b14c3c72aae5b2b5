"""A service that sends mail through Sluice, using only the ``sluice-client`` package
(generated stubs; grpcio and protobuf are its only dependencies).

    pip install ./libs/client          # or: uv pip install ./libs/client
    SLUICE_TOKEN=... python examples/python/client.py --target localhost:50051

It creates (or reuses) a template, previews it, checks the recipient is not suppressed,
schedules a message for 09:00 tomorrow in Europe/Berlin, finds it by recipient, and
cancels it. Every step prints one line.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import uuid

import grpc

from sluice.v1 import (
    ingest_pb2,
    ingest_pb2_grpc,
    intent_pb2,
    suppression_pb2,
    suppression_pb2_grpc,
    template_pb2,
    template_pb2_grpc,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="ingest host:port")
    parser.add_argument("--recipient", default="ana@example.com")
    parser.add_argument("--run", default=uuid.uuid4().hex[:8], help="makes keys unique")
    parser.add_argument(
        "--token",
        default=os.environ.get("SLUICE_TOKEN", ""),
        help="bearer token with the admin scope (default $SLUICE_TOKEN)",
    )
    args = parser.parse_args(argv)
    # Every call carries the token; without one, only a server with auth off answers.
    auth = (("authorization", f"Bearer {args.token}"),) if args.token else ()

    with grpc.insecure_channel(args.target) as channel:
        templates = template_pb2_grpc.TemplateServiceStub(channel)
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        suppressions = suppression_pb2_grpc.SuppressionServiceStub(channel)

        created = templates.CreateTemplate(
            template_pb2.CreateTemplateRequest(
                template_id="example-reminder",
                subject="See you tomorrow, {{ name }}",
                html_body="<p>Hi {{ name }}, your appointment is at {{ time }}.</p>",
                text_body="Hi {{ name }}, your appointment is at {{ time }}.",
                variables=["name", "time"],
                from_address="Example <noreply@example.com>",
            ),
            timeout=10,
            metadata=auth,
        )
        template = created.template
        print(f"template {template.id} version {template.version} (new: {created.created})")

        preview = templates.PreviewTemplate(
            template_pb2.PreviewTemplateRequest(
                template_id=template.id, variables={"name": "Ana", "time": "09:00"}
            ),
            timeout=10,
            metadata=auth,
        )
        print(f"preview subject: {preview.subject}")

        check = suppressions.CheckSuppression(
            suppression_pb2.CheckSuppressionRequest(addresses=[args.recipient]),
            timeout=10,
            metadata=auth,
        )
        print(f"suppressed: {check.results[0].suppressed}")

        tomorrow = datetime.date.today() + datetime.timedelta(days=1)
        submitted = ingest.SubmitIntent(
            ingest_pb2.SubmitIntentRequest(
                intent=intent_pb2.IntentSubmission(
                    idempotency_key=f"example-python-{args.run}",
                    campaign_id=f"example-{args.run}",
                    recipient=args.recipient,
                    intent=intent_pb2.INTENT_TRANSACTIONAL,
                    template_id=template.id,
                    variables={"name": "Ana", "time": "09:00"},
                    send_at_local=intent_pb2.LocalDateTime(
                        date_time=f"{tomorrow.isoformat()}T09:00:00", time_zone="Europe/Berlin"
                    ),
                )
            ),
            timeout=10,
            metadata=auth,
        )
        intent = submitted.intent
        print(f"intent {intent.id} send_at {intent.send_at.ToJsonString()}")

        listed = ingest.ListIntents(
            ingest_pb2.ListIntentsRequest(recipient=args.recipient, page_size=10),
            timeout=10,
            metadata=auth,
        )
        print(f"found by recipient: {intent.id in {i.id for i in listed.intents}}")

        cancelled = ingest.CancelIntent(
            ingest_pb2.CancelIntentRequest(id=intent.id), timeout=10, metadata=auth
        )
        print(f"cancelled: {intent_pb2.IntentStatus.Name(cancelled.intent.status)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except grpc.RpcError as exc:  # a status with its message, not a traceback
        print(f"sluice answered {exc.code().name}: {exc.details()}", file=sys.stderr)
        sys.exit(1)
