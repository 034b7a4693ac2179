#!/usr/bin/env bash
# The plugin ABI guard: compares the ABI described by a freshly built probe library
# (abi_probe.c compiled against plugin-api/include) with the committed baseline.
#
# Regenerate the baseline after an intended ABI change (a minor addition, or a major bump
# together with LOOM_ABI_MAJOR in plugin-api/include/loom/abi.h):
#   cmake --build build --target loom_abi_probe && \
#   tests/abi/check_abi.sh --regenerate build/tests/abi/libloom_abi_probe.so plugin-api/include tests/abi
# which runs `abidw --no-corpus-path --no-comp-dir-path --no-show-locs` on the probe into
# tests/abi/loom_abi_v1.xml and writes the headers' LOOM_ABI_MAJOR into tests/abi/baseline_major.txt.
#
# Usage: check_abi.sh [--expect-incompatible | --regenerate] PROBE_SO HEADERS_DIR BASELINE_DIR
#   PROBE_SO      the probe library built from abi_probe.c against HEADERS_DIR
#   HEADERS_DIR   the include directory holding loom/*.h (LOOM_ABI_MAJOR is read from loom/abi.h)
#   BASELINE_DIR  holds loom_abi_v1.xml and baseline_major.txt
#
# Classification. abidiff's exit status is a bit mask: 1 error, 2 usage error, 4 ABI change,
# 8 incompatible change. abidiff sets 8 only for removed symbols; a deleted, reordered or
# retyped struct member is reported as 4 ("a human must review"). So this script decides:
#   compatible   = every change is a struct growing at its end (abidiff run with a suppression
#                  of "data member inserted at end" reports nothing) and no member of any
#                  struct moved (no "offset changed": a struct embedded by value, such as
#                  loom_lifecycle in every vtable, grew and shifted its container's members),
#                  plus newly added probe functions (new types);
#   incompatible = anything else.
# An incompatible change fails while LOOM_ABI_MAJOR equals baseline_major.txt; after a major
# bump it passes with a note to regenerate the baseline. A compatible change passes with a
# note to regenerate the baseline. Exit 0 = pass, 1 = fail.
# --expect-incompatible inverts the verdict (used by the test proving that the guard fires):
# exit 0 only when the change is classified incompatible under an unchanged major.
set -u

mode=check
case "${1:-}" in
  --expect-incompatible) mode=expect; shift ;;
  --regenerate) mode=regenerate; shift ;;
esac
if [ $# -ne 3 ]; then
  echo "usage: $0 [--expect-incompatible | --regenerate] PROBE_SO HEADERS_DIR BASELINE_DIR" >&2
  exit 1
fi
probe=$1 headers=$2 basedir=$3
baseline=$basedir/loom_abi_v1.xml
abidw_flags=(--no-corpus-path --no-comp-dir-path --no-show-locs)

for tool in abidw abidiff; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "FAIL: $tool not found: install abigail-tools (Debian/Ubuntu: apt-get install abigail-tools)" >&2
    exit 1
  fi
done
[ -f "$probe" ] || { echo "FAIL: probe library $probe does not exist" >&2; exit 1; }

major=$(sed -n 's/^#define LOOM_ABI_MAJOR \([0-9][0-9]*\).*/\1/p' "$headers/loom/abi.h")
[ -n "$major" ] || { echo "FAIL: no '#define LOOM_ABI_MAJOR <n>' in $headers/loom/abi.h" >&2; exit 1; }

if [ "$mode" = regenerate ]; then
  abidw "${abidw_flags[@]}" "$probe" > "$baseline.tmp" && mv "$baseline.tmp" "$baseline" || exit 1
  echo "$major" > "$basedir/baseline_major.txt"
  echo "wrote $baseline and $basedir/baseline_major.txt (major $major)"
  exit 0
fi

[ -f "$baseline" ] || { echo "FAIL: baseline $baseline missing" >&2; exit 1; }
base_major=$(tr -d '[:space:]' < "$basedir/baseline_major.txt" 2>/dev/null)
[ -n "$base_major" ] || { echo "FAIL: $basedir/baseline_major.txt missing or empty" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fresh=$work/fresh.xml
if ! abidw "${abidw_flags[@]}" "$probe" > "$fresh" 2> "$work/abidw.err"; then
  echo "FAIL: abidw could not read $probe (built without -g?):" >&2
  cat "$work/abidw.err" >&2
  exit 1
fi

# Coverage: every loom_* type named in the headers must be in the probe's DWARF.
missing=()
while IFS= read -r name; do
  grep -q "name='$name'" "$fresh" || missing+=("$name")
done < <(
  { grep -ohE '^\} *loom_[a-z0-9_]+;' "$headers"/loom/*.h | sed -E 's/^\} *//; s/;$//'
    grep -ohE '^typedef [a-z0-9_ ]+ loom_[a-z0-9_]+;' "$headers"/loom/*.h | sed -E 's/.* //; s/;$//'
    grep -ohE '^typedef .*\(\*loom_[a-z0-9_]+\)' "$headers"/loom/*.h | sed -E 's/.*\(\*//; s/\)$//'
  } | sort -u)
if [ ${#missing[@]} -gt 0 ]; then
  echo "FAIL: types of the headers missing from the probe (add a PROBE_TYPE line to abi_probe.c): ${missing[*]}" >&2
  [ "$mode" = expect ] || exit 1
fi

abidiff "$baseline" "$fresh" > "$work/report.txt" 2>&1
rc=$?
if [ $((rc & 1)) -ne 0 ]; then
  echo "FAIL: abidiff failed (exit $rc):" >&2
  cat "$work/report.txt" >&2
  exit 1
fi

verdict=same
if [ $rc -ne 0 ]; then
  # (Debian 12's libabigail applies change_kind only together with a name pattern.)
  cat > "$work/append.supp" <<'SUPP'
[suppress_type]
  type_kind = struct
  has_data_member_inserted_at = end
[suppress_function]
  change_kind = added-function
  name_regexp = ^loom_abi_probe_
SUPP
  abidiff --suppressions "$work/append.supp" "$baseline" "$fresh" > "$work/suppressed.txt" 2>&1
  src=$?
  if [ $((rc & 8)) -ne 0 ] || [ $src -ne 0 ] || grep -q 'offset changed' "$work/report.txt"; then
    verdict=incompatible
  else
    verdict=compatible
  fi
fi

case "$verdict" in
  same)
    echo "ABI unchanged against the baseline (major $base_major)"
    [ "$mode" = expect ] && { echo "FAIL: expected an incompatible change, found none" >&2; exit 1; }
    exit 0 ;;
  compatible)
    cat "$work/report.txt"
    echo "NOTE: compatible ABI additions (structs grown at their end, new types) against the baseline;"
    echo "NOTE: refresh the baseline: see the regeneration command at the top of $0"
    [ "$mode" = expect ] && { echo "FAIL: expected an incompatible change, found only compatible ones" >&2; exit 1; }
    exit 0 ;;
  incompatible)
    cat "$work/report.txt"
    if [ "$major" != "$base_major" ]; then
      echo "NOTE: incompatible ABI change with LOOM_ABI_MAJOR bumped ($base_major -> $major): regenerate the baseline"
      [ "$mode" = expect ] && { echo "FAIL: expected the guard to fire, but the major was bumped" >&2; exit 1; }
      exit 0
    fi
    echo "INCOMPATIBLE ABI CHANGE under unchanged LOOM_ABI_MAJOR $major (report above)."
    echo "Either undo it, append new fields at the end of the struct instead, or bump LOOM_ABI_MAJOR."
    [ "$mode" = expect ] && { echo "OK: the guard fired as expected"; exit 0; }
    exit 1 ;;
esac
