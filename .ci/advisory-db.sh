#!/usr/bin/env bash
# Refreshes .ci/advisory-db, the snapshot of the RustSec advisory database that `cargo deny`
# checks against where github.com cannot be reached. Run it where it can be:
#
#   git clone https://github.com/rustsec/advisory-db /tmp/advisory-db
#   .ci/advisory-db.sh /tmp/advisory-db
#
# It keeps the advisories of every crate named in Cargo.lock (whatever the version: cargo deny
# matches versions itself), lists those names in crates.txt so CI can tell when Cargo.lock
# names a crate the snapshot did not look at, and records the database commit in SOURCE.
set -euo pipefail
cd "$(dirname "$0")/.."
db=${1:?usage: .ci/advisory-db.sh PATH-TO-ADVISORY-DB-CLONE}
out=.ci/advisory-db
rm -rf "$out/crates"
mkdir -p "$out/crates"
# Every package, the vendored glommio and quinn-proto included (deny.toml says why).
names=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | LC_ALL=C sort -u)
printf '%s\n' $names > "$out/crates.txt"
for name in $names; do
  if [ -d "$db/crates/$name" ]; then
    cp -r "$db/crates/$name" "$out/crates/"
  fi
done
cp "$db/LICENSE.txt" "$out/LICENSE.txt"
git -C "$db" log -1 --format='%H %cI' > "$out/SOURCE"
echo "advisory snapshot: $(ls "$out/crates" | wc -l) crates with advisories of $(wc -l < "$out/crates.txt") in Cargo.lock, database $(cat "$out/SOURCE")"
