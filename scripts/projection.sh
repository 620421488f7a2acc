#!/usr/bin/env bash
# Measures kvc's projection family (P3 ThinK, P1 PCA, P4 Loki, P5 CSKV: every
# `--project` configuration of `kvc-fidelity --list`) on the kvref model
# against full_cache (fp32), next to a few reference points of the other
# families, and regenerates docs/PROJECTION.md and its plot
# (docs/projection.png). It is scripts/fidelity.sh with a filter on the
# configuration list and another report: same tool, same text, same columns
# as docs/FIDELITY.md.
#
#   scripts/projection.sh                      # 8 windows per configuration
#   FIDELITY_WINDOWS=4 scripts/projection.sh   # quicker and noisier
#
# Environment: as scripts/fidelity.sh (BUILD_DIR, FIDELITY_MODEL,
# FIDELITY_WINDOWS, KVC_FIDELITY_SKIP_DEPS, KVC_FIDELITY_NO_BUILD);
# PROJECTION_DOC sets the report (default docs/PROJECTION.md).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

doc=${PROJECTION_DOC:-docs/PROJECTION.md}
windows=${FIDELITY_WINDOWS:-8}

# Lines of `kvc-fidelity --list`, tabs as spaces: method cache evict every merge project.
# Every projection (its last field a METHOD:VALUE, not none), and the
# reference points: full_cache in f32 (the reference) and f16, the codecs
# q8_0, q4_0 and kivi:2, and SnapKV keeping half and a quarter of the prompt.
references='^[^ ]+ (full:f32|full:f16|q8_0|q4_0|kivi:2) none 0 none none$|^snapkv none:f16 snapkv:0\.(5|25) 0 none none$'
projections=' [a-z_]+:[^ ]+$'

FIDELITY_ONLY="$references|$projections" \
  FIDELITY_DOC="$doc" \
  FIDELITY_PLOT="$(dirname "$doc")/projection.png" \
  FIDELITY_REPORT=scripts/projection_report.py \
  FIDELITY_COMMAND="FIDELITY_WINDOWS=$windows scripts/projection.sh" \
  FIDELITY_WINDOWS="$windows" \
  exec bash scripts/fidelity.sh
