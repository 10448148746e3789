"""Boot the lab's kernel under QEMU and run the `realkernel` tests inside it.

    python -m tests.realkernel.runner --kernel BZIMAGE --initrd INITRD [PYTEST_ARG...]

The guest gets the host's root read-only over 9p and build/realkernel/results writable; its
init (fixtures/realkernel/init) chroots into the host's root and runs pytest with the
arguments on the kernel command line, writing a junit file into the results directory. This
fails loudly unless the VM booted, pytest ran, and it passed as many tests as the same
selection collects here, with none skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from orchestrator.native.builds import cache_root

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "build" / "realkernel" / "results"
JUNIT = RESULTS / "junit.xml"
SERIAL = RESULTS / "serial.log"
DEFAULT_SELECTION = ["tests/realkernel"]


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class Totals:
    tests: int
    failures: int
    errors: int
    skipped: int

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


def pytest_args(selection: list[str]) -> list[str]:
    return ["-q", "--color=no", "-m", "realkernel", f"--junitxml={JUNIT.relative_to(ROOT)}", *selection]


def expected_count(selection: list[str]) -> int:
    """How many tests the selection has: collected here, as the VM will."""
    env = dict(os.environ, ORCHESTRATOR_REALKERNEL="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "realkernel",
            *selection,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise LabError(f"collecting {selection} failed:\n{out.stdout}{out.stderr}")
    return sum("::" in line for line in out.stdout.splitlines())


def qemu_command(kernel: Path, initrd: Path, args: list[str], memory: str, cpus: int) -> list[str]:
    """-cpu max: the host's Python and numpy need its instruction set under TCG."""
    if any("," in a or " " in a for a in args):
        raise LabError(f"pytest arguments cannot contain ',' or ' ' (the kernel command line): {args}")
    cache = cache_root().parent  # the native builds (fixture guest, plugin), read in place
    cmdline = f"console=ttyS0 quiet panic=-1 rk.project={ROOT} rk.cache={cache} rk.args={','.join(args)}"
    return [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", str(cpus), "-m", memory,
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={RESULTS},mount_tag=results,security_model=none",
    ]  # fmt: skip


def boot(command: list[str], timeout: float) -> str:
    """Run the VM to power-off, echoing its console; returns the console output."""
    lines: list[str] = []
    with (
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as vm,
        SERIAL.open("w", buffering=1) as log,
    ):
        watchdog = threading.Timer(timeout, vm.kill)
        watchdog.start()
        try:
            assert vm.stdout is not None
            for line in vm.stdout:
                log.write(line)
                lines.append(line)
                print(f"  vm| {line}", end="", flush=True)
            vm.wait()
        finally:
            watchdog.cancel()
        if vm.returncode < 0:
            raise LabError(f"the VM ran past {timeout:.0f} s and was killed; console in {SERIAL}")
    return "".join(lines)


def totals(path: Path) -> Totals:
    suite = ET.parse(path).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    return Totals(*(int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")))


def check(console: str, expected: int, junit: Path = JUNIT) -> Totals:
    """The VM's verdict: every way it can fail is an error naming what happened."""
    if "RK up" not in console:
        raise LabError(f"the VM did not come up (no init output); console in {SERIAL}")
    setup = re.search(r"^RK E (.*)$", console, re.M)
    if setup:
        raise LabError(f"the VM's setup failed: {setup.group(1)}")
    exit_line = re.search(r"^RK exit (\d+)$", console, re.M)
    if exit_line is None:
        raise LabError(f"pytest in the VM did not finish (kernel panic or hang?); console in {SERIAL}")
    kernel = re.findall(r"^RK K (.*)$", console, re.M)
    if kernel:
        raise LabError("the kernel reported problems during the run:\n  " + "\n  ".join(kernel))
    if not junit.exists():
        raise LabError(f"pytest in the VM exited {exit_line.group(1)} and wrote no {junit}")
    got = totals(junit)
    if int(exit_line.group(1)) != 0 or got.failures or got.errors:
        raise LabError(f"realkernel tests failed in the VM: {got}")
    if got.skipped:
        raise LabError(f"{got.skipped} realkernel tests were skipped in the VM; none may be")
    if got.passed < expected:
        raise LabError(f"the VM passed {got.passed} realkernel tests, {expected} were collected")
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--initrd", type=Path, required=True)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("selection", nargs="*", default=DEFAULT_SELECTION)
    opts = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    JUNIT.unlink(missing_ok=True)
    try:
        expected = expected_count(opts.selection)
        if expected == 0:
            raise LabError(f"{opts.selection} has no realkernel tests")
        began = time.monotonic()
        console = boot(
            qemu_command(opts.kernel, opts.initrd, pytest_args(opts.selection), opts.memory, opts.cpus), opts.timeout
        )
        got = check(console, expected)
    except LabError as exc:
        print(f"realkernel: FAILED: {exc}", file=sys.stderr)
        return 1
    print(
        f"realkernel: {got.passed} tests passed in the nested kernel ({time.monotonic() - began:.1f} s, boot to "
        "power-off)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
