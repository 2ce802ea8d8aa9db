"""``python -m vfio_ep.bench [NAME ...] [--out FILE] [--quick]``

Runs the named benchmarks (all by default), prints each table, and merges the results into
``results/bench.json`` and ``results/bench.md`` (or next to ``--out``).  A
benchmark that fails is reported and the others still run; the exit status says so.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import click

from vfio_ep.bench import NAMES
from vfio_ep.bench.common import DEFAULT_OUT, BenchError, Result, write_results


def _runners(quick: bool) -> dict[str, Callable[[], Result]]:
    """Each benchmark with its full or ``--quick`` (sanity-check sized) parameters."""
    from vfio_ep.bench import (
        bars,
        dispatch,
        doorbell,
        ep_guest,
        ep_nvme,
        ep_vntb,
        idle,
        ntb,
        ntb_pair,
        scale,
        transfer,
        trapped,
        wake,
    )

    if quick:
        return {"dispatch": lambda: dispatch.run(n=20_000, reps=2),
                "doorbell": lambda: doorbell.run(n=200, n_mmio=2000),
                "trapped": lambda: trapped.run(n=200, n_mmio=2000, reps=1),
                "bars": lambda: bars.run(n=200, n_mmio=2000),
                "transfer": lambda: transfer.run(sizes=(1 << 20,), reps=1),
                "idle": lambda: idle.run(seconds=3),
                "ntb": lambda: ntb.run(count=20),
                "ntb-pair": lambda: ntb_pair.run(pings=20),
                "scale": lambda: scale.run(devices=(1, 4), reads=2000),
                "ep-guest": lambda: ep_guest.run(n=200, n_mmio=2000, size=1 << 20, reps=1),
                "ep-vntb": lambda: ep_vntb.run(count=20),
                "ep-nvme": lambda: ep_nvme.run(mib=8),
                "wake": lambda: wake.run(n=2000, reps=1)}
    return {"dispatch": dispatch.run, "doorbell": doorbell.run, "trapped": trapped.run,
            "bars": bars.run, "transfer": transfer.run, "idle": idle.run, "ntb": ntb.run,
            "ntb-pair": ntb_pair.run, "scale": scale.run, "ep-guest": ep_guest.run,
            "ep-vntb": ep_vntb.run, "ep-nvme": ep_nvme.run, "wake": wake.run}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT, show_default=True,
              help="Results JSON (the markdown table goes next to it as .md).")
@click.option("--quick", is_flag=True,
              help="Small N and sizes: checks the plumbing, numbers are rough.")
def main(names: tuple[str, ...], out: Path, quick: bool) -> None:
    """vfio-ep benchmarks, each a ratio to a baseline measured in the same run; NAMEs pick
    some (default: all)."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise click.UsageError(f"unknown benchmark {', '.join(unknown)}; choose from "
                               f"{', '.join(NAMES)}")
    raise SystemExit(_run(names, out, quick))


def _run(names: tuple[str, ...], out_file: Path, quick: bool) -> int:
    runners = _runners(quick)
    started = time.monotonic()
    results: list[Result] = []
    failed: list[str] = []
    for name in names or NAMES:
        print(f"-- {name} ...", file=sys.stderr, flush=True)
        try:
            result = runners[name]()
        except BenchError as e:
            print(f"{name}: FAILED: {e}", file=sys.stderr)
            failed.append(name)
            continue
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        results.append(result)
        print(f"{result.text()}\n   ({result.seconds:.0f} s)\n", flush=True)
    if results:
        out, md = write_results(results, out_file)
        print(f"results: {out}, {md}")
    print(f"total {time.monotonic() - started:.0f} s" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    main()
