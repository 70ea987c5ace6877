"""A parent instance that watches its whole subtree and prints completions as they bubble up.

    python clients/python/examples/parent.py --id global [--after SEQ] [--tasks N]

It keeps its place in a cursor file (``--cursor-file``), so a restart resumes exactly where it
left off: nothing missed, nothing printed twice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hopper_delegation import CursorExpired, EventKind, HopperClient

KINDS = [EventKind.DELEGATION_COMPLETED, EventKind.TASK_COMPLETED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--id", required=True, help="the instance whose subtree to watch")
    parser.add_argument("--after", type=int, help="resume after this sequence (default: now)")
    parser.add_argument("--cursor-file", type=Path, help="where to keep the cursor")
    parser.add_argument("--tasks", type=int, default=0, help="exit after N tasks (0: never)")
    args = parser.parse_args()
    after = args.after
    if args.cursor_file and args.cursor_file.exists():
        after = int(args.cursor_file.read_text())

    with HopperClient() as client:
        watch = client.watch(args.id, descendants=True, after=after, kinds=KINDS)
        print(f"watching {args.id} and below", flush=True)
        finished = 0
        try:
            for event in watch:
                hop = event.delegation
                where = f"{hop.source_instance_id} -> {hop.target_instance_id}" if hop else ""
                if event.kind is EventKind.TASK_COMPLETED:
                    finished += 1
                    result = hop.result if hop else None
                    print(f"{event.sequence:>6}  task {event.task_id} done: {result}", flush=True)
                else:
                    print(f"{event.sequence:>6}  {where} completed", flush=True)
                if args.cursor_file and watch.cursor is not None:
                    args.cursor_file.write_text(str(watch.cursor))
                if args.tasks and finished >= args.tasks:
                    break
        except CursorExpired as expired:
            raise SystemExit(
                f"history before {expired.oldest_available} is gone: re-read the state, then "
                f"resume with --after {expired.resume_after}"
            ) from expired
        finally:
            watch.close()


if __name__ == "__main__":
    main()
