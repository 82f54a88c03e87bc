"""Run Ascend's own operator tests (Ascend/op-plugin ``test/test_custom_ops`` at a pinned commit)
unchanged on mc2-emu's drop-in torch_npu, one test method per fresh process, on the chips each
test's ``SupportedDevices`` names; print one row per (file, method, chip) and a summary.

    python scripts/ascend_op_tests.py --source /path/to/op-plugin        # a git dir / checkout
    python scripts/ascend_op_tests.py                                    # GitHub's archive
    python scripts/ascend_op_tests.py --source ... --only '^test_npu_'   # some tests only (a regex)
    python scripts/ascend_op_tests.py --list                             # the file table

The table of files is :data:`emu.npu.upstream.FILES`; the files go to a temporary directory.
Exit status 1 when a test fails.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from emu.npu import upstream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="Ascend/op-plugin: a git directory or checkout, or a directory holding "
                                         f"{upstream.TEST_DIR} (default: download the commit's archive)")
    parser.add_argument("--commit", default=upstream.COMMIT, help="the pinned commit (default %(default)s)")
    parser.add_argument("--only", help="a regular expression: run the tests whose file::Class.method it matches")
    parser.add_argument("--jobs", type=int, default=2, help="single-process tests run at a time (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test method (default 900)")
    parser.add_argument("--list", action="store_true", help="print the file table and exit")
    args = parser.parse_args()
    if args.list:
        for f in upstream.FILES:
            env = " ".join(f"{k}={v}" for k, v in f.env.items())
            print(f"{f.name:48} {f.what:40} {env}")
        return 0
    with tempfile.TemporaryDirectory(prefix="ascend-op-tests-") as tmp:
        paths = upstream.fetch_tests(tmp, args.source, args.commit)
        print(f"{upstream.REPOSITORY}@{args.commit[:8]}: {len(paths)} files in {tmp}", flush=True)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for r in upstream.run_all(paths, tmp, args.jobs, args.timeout, args.only):
            counts[r.method.file][r.status] += 1
            reason = f"  {r.reason}" if r.reason else ""
            print(f"{r.status:4}  {r.chip:2}  {r.method.file}::{r.method.test_id}  ({r.seconds:.0f} s){reason}",
                  flush=True)
    print("\nsummary (pass / fail / skip):")
    total: collections.Counter = collections.Counter()
    for name in [f.name for f in upstream.FILES if f.name in counts]:
        c = counts[name]
        total.update(c)
        print(f"  {name:48} {c['pass']:3} {c['fail']:3} {c['skip']:3}")
    print(f"  {'total':48} {total['pass']:3} {total['fail']:3} {total['skip']:3}")
    return 1 if total["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
