// A Node service that sends mail through Sluice with @grpc/grpc-js. The contracts are
// loaded from the .proto files at run time (@grpc/proto-loader), so nothing is generated.
//
//   cd examples/node && npm ci && SLUICE_TOKEN=... node client.js --target localhost:50051
//
// It creates (or reuses) a template, schedules a message for 09:00 tomorrow in
// Europe/Berlin, finds it by recipient and cancels it; every step prints one line.
"use strict";

const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "localhost:50051" },
    recipient: { type: "string", default: "ana@example.com" },
    run: { type: "string", default: Math.random().toString(16).slice(2, 10) },
    protos: { type: "string", default: path.join(__dirname, "..", "..", "proto") },
    // a bearer token with the admin scope; without one only a server with auth off answers
    token: { type: "string", default: process.env.SLUICE_TOKEN ?? "" },
  },
});

const definition = protoLoader.loadSync(
  ["sluice/v1/ingest.proto", "sluice/v1/template.proto"],
  // keepCase: false gives lowerCamelCase fields, as in proto3 JSON; enums as their names
  { includeDirs: [args.protos], longs: String, enums: String, defaults: true, oneofs: true },
);
const sluice = grpc.loadPackageDefinition(definition).sluice.v1;
const credentials = grpc.credentials.createInsecure();
const ingest = new sluice.IngestService(args.target, credentials);
const templates = new sluice.TemplateService(args.target, credentials);

const metadata = new grpc.Metadata();
if (args.token) metadata.set("authorization", `Bearer ${args.token}`);

// Each call as a promise, with a deadline, so a dead server fails instead of hanging.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 10_000);
    client[method](request, metadata, { deadline }, (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

async function main() {
  const created = await call(templates, "CreateTemplate", {
    templateId: "example-reminder",
    subject: "See you tomorrow, {{ name }}",
    htmlBody: "<p>Hi {{ name }}, your appointment is at {{ time }}.</p>",
    textBody: "Hi {{ name }}, your appointment is at {{ time }}.",
    variables: ["name", "time"],
    fromAddress: "Example <noreply@example.com>",
  });
  console.log(`template ${created.template.id} version ${created.template.version} (new: ${created.created})`);

  const tomorrow = new Date(Date.now() + 86_400_000).toISOString().slice(0, 10);
  const submitted = await call(ingest, "SubmitIntent", {
    intent: {
      idempotencyKey: `example-node-${args.run}`,
      campaignId: `example-${args.run}`,
      recipient: args.recipient,
      intent: "INTENT_TRANSACTIONAL",
      templateId: created.template.id,
      variables: { name: "Ana", time: "09:00" },
      sendAtLocal: { dateTime: `${tomorrow}T09:00:00`, timeZone: "Europe/Berlin" },
    },
  });
  const intent = submitted.intent;
  const sendAt = new Date(Number(intent.sendAt.seconds) * 1000).toISOString();
  console.log(`intent ${intent.id} send_at ${sendAt}`);

  const listed = await call(ingest, "ListIntents", { recipient: args.recipient, pageSize: 10 });
  console.log(`found by recipient: ${listed.intents.some((i) => i.id === intent.id)}`);

  const cancelled = await call(ingest, "CancelIntent", { id: intent.id });
  console.log(`cancelled: ${cancelled.intent.status}`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(`sluice answered ${grpc.status[err.code] ?? err.code}: ${err.details ?? err.message}`);
    process.exit(1);
  },
);
