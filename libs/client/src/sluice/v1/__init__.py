"""Generated from proto/sluice/v1 by scripts/gen_protos.sh; do not edit."""
