"""Boot a stock distribution kernel under qemu (TCG) and run one command in it, against this host's files.

The guest sees the host's root file system read-only over virtio-9p, with a
tmpfs overlay on top (so the repository, its venv and every installed tool are
there, at the same paths), plus a read-write share for the command, its output
and its exit status. It loads the kernel modules asked for (failing loudly if
one is missing), runs the command, and powers off. A guest that hangs is killed
after the timeout, one that panics reboots into qemu's ``-no-reboot`` exit:
both are failures, reported with the tail of the console log.

Why TCG: ``/dev/kvm`` exists on the CI machines but does not run a stock guest
kernel. ``-cpu max`` gives the guest AES-NI (ESP uses it later).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("VEILNET_VM_CACHE", "/var/tmp/veilnet-vm"))
# Modules the initramfs needs to reach the host's root: virtio PCI transport, 9p, overlayfs.
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# What the data-plane tests use; each is loaded in the guest before the command runs (built-ins are fine).
DEFAULT_MODULES = ("wireguard", "geneve", "vxlan", "bridge", "br_netfilter", "veth", "nf_tables",
                   "nft_ct", "nft_chain_nat", "nf_conntrack", "nfnetlink_log", "nft_log", "nft_limit",
                   "nft_hash", "nft_fib_inet", "nft_reject_inet", "tun", "xfrm_user", "esp4", "esp6", "gcm",
                   "seqiv", "ctr", "ghash_clmulni_intel", "aesni_intel")
RESULTS_IN_GUEST = "/mnt/vm-results"
TAIL_LINES = 80


class VmError(RuntimeError):
    """The harness could not run the command (missing tool, kernel, module), or the guest died."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    image: Path
    release: str

    @property
    def modules(self) -> Path:
        return Path("/lib/modules") / self.release


def pick_kernel(explicit: str | None = None) -> Kernel:
    """``explicit``, or the newest /boot/vmlinuz-* that is not the running kernel."""
    if explicit:
        image = Path(explicit)
        if not image.is_file():
            raise VmError(f"kernel {image} does not exist")
        release = image.name.removeprefix("vmlinuz-")
    else:
        running = platform.release()
        candidates = sorted((p for p in Path("/boot").glob("vmlinuz-*") if p.name != f"vmlinuz-{running}"),
                            key=lambda p: p.stat().st_mtime, reverse=True)
        if not candidates:
            raise VmError("no kernel to boot: install one (INITRD=No apt-get install --no-install-recommends "
                          "linux-image-amd64) or pass --kernel")
        image = candidates[0]
        release = image.name.removeprefix("vmlinuz-")
    kernel = Kernel(image, release)
    if not kernel.modules.is_dir():
        raise VmError(f"kernel {release}: its modules are missing ({kernel.modules})")
    return kernel


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise VmError(f"{tool} is not installed (apt-get install --no-install-recommends qemu-system-x86 "
                      "busybox-static)")
    return path


def module_files(kernel: Kernel, names: Sequence[str]) -> list[Path]:
    """The .ko files of ``names`` and their dependencies, in load order (via modprobe --show-depends)."""
    files: list[Path] = []
    for name in names:
        done = subprocess.run(["modprobe", "-S", kernel.release, "--show-depends", name], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise VmError(f"kernel {kernel.release} has no module {name}: {done.stderr.strip()}")
        for line in done.stdout.splitlines():
            words = line.split()
            if words and words[0] == "insmod" and Path(words[1]) not in files:
                files.append(Path(words[1]))
    return files


INIT = r"""#!/bin/busybox sh
# Stage 1 (initramfs): reach the host's root over 9p, overlay a tmpfs on it, switch to it.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /lower /upper /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "veilnet-vm: $*" > /dev/console; echo o > /proc/sysrq-trigger; sleep 10; }
for m in $(cat /modules.order); do insmod "$m" || fail "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "9p root"
mount -t tmpfs -o size=75% tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot || fail "overlay"
mkdir -p /newroot@RESULTS@
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /newroot@RESULTS@ || fail "results share"
umount /sys /proc 2>/dev/null; umount /dev 2>/dev/null
exec switch_root /newroot /bin/sh @STAGE2@
"""


def build_initramfs(kernel: Kernel, busybox: str, init: str | None = None) -> Path:
    """A cpio archive of busybox, /init (``init``, default: this harness's) and the boot modules.

    Cached by kernel and content.
    """
    modules = module_files(kernel, BOOT_MODULES)
    if init is None:
        init = INIT.replace("@RESULTS@", RESULTS_IN_GUEST).replace("@STAGE2@", str(HERE / "guest.sh"))
    digest = hashlib.sha256((init + kernel.release + "".join(map(str, modules))).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"initramfs-{kernel.release}-{digest}.cpio"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="veilnet-initramfs-") as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        shutil.copy2(busybox, root / "bin" / "busybox")
        (root / "init").write_text(init)
        (root / "init").chmod(0o755)
        order = []
        for ko in modules:
            dest = root / "modules" / ko.name
            dest.parent.mkdir(exist_ok=True)
            shutil.copy2(ko, dest)
            order.append(f"/modules/{ko.name}")
        (root / "modules.order").write_text("\n".join(order) + "\n")
        files = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root, input=files.encode(), stdout=out,
                           check=True)
        partial.rename(target)
    return target


@dataclasses.dataclass
class Result:
    status: int
    seconds: float
    boot_seconds: float | None
    console: Path
    output: Path


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


def run(command: Sequence[str], *, kernel: Kernel | None = None, modules: Sequence[str] = DEFAULT_MODULES,
        timeout: float = 1800, memory: str = "3G", cpus: int | None = None, results: Path | None = None,
        env: dict[str, str] | None = None, workdir: Path = REPO, stream: bool = True) -> Result:
    """Run ``command`` in a guest booted on ``kernel``; its output streams to this process's stdout."""
    _require("qemu-system-x86_64")
    busybox = _require("busybox")
    _require("cpio")
    kernel = kernel or pick_kernel()
    for name in modules:
        module_files(kernel, [name])  # fail here, loudly, before booting, if the kernel lacks one
    initramfs = build_initramfs(kernel, busybox)
    results = results or Path(tempfile.mkdtemp(prefix="veilnet-vm-"))
    results.mkdir(parents=True, exist_ok=True)
    for name in ("exit-status", "output.log", "booted", "heartbeat.log"):
        (results / name).unlink(missing_ok=True)
    environment = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/root", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                   "VEILNET_REALKERNEL": "1",
                   "VEILNET_TIME_SCALE": "5",  # deadlines of integration/lab.py: TCG runs it all much slower
                   # failure diagnostics (integration/conftest.py) land on the share, not the guest's tmpfs
                   "VEILNET_RESULTS": RESULTS_IN_GUEST, **(env or {})}
    script = ["set -e", f"cd {shlex.quote(str(workdir))}"]
    script += [f"export {k}={shlex.quote(v)}" for k, v in environment.items()]
    script += ["exec " + shlex.join(command)]
    (results / "command.sh").write_text("\n".join(script) + "\n")
    (results / "modules").write_text("\n".join(modules) + "\n")
    shares = [("hostroot", Path("/"), True), ("results", results, False)]
    return boot(kernel, initramfs, shares, results=results, timeout=timeout, memory=memory, cpus=cpus,
                stream=stream)


def boot(kernel: Kernel, initramfs: Path, shares: Sequence[tuple[str, Path, bool]], *, results: Path,
         timeout: float, memory: str = "3G", cpus: int | None = None, append: str = "",
         stream: bool = True) -> Result:
    """Boot ``kernel`` with ``initramfs`` and the 9p ``shares`` (mount tag, host path, read-only), wait for it.

    The guest's init writes ``exit-status`` (and, as it goes, ``output.log``, ``booted`` and
    ``heartbeat.log``) to ``results``, which must be one of the shares.
    """
    qemu = _require("qemu-system-x86_64")
    console = results / "console.log"
    cpus = cpus or max(1, min(2, os.cpu_count() or 1))
    argv = [
        qemu, "-accel", "tcg,thread=multi,tb-size=1024", "-cpu", "max", "-smp", str(cpus), "-m", memory,
        "-machine", "q35",
        "-display", "none", "-no-reboot", "-nic", "none", "-monitor", "none",
        "-serial", f"file:{console}",
        "-kernel", str(kernel.image), "-initrd", str(initramfs),
        "-append", f"console=ttyS0 panic=-1 quiet loglevel=4 {append}".strip(),
    ]
    for tag, path, readonly in shares:
        # multidevs=remap: the host's / spans file systems whose inode numbers collide (procfs and sysfs both
        # start at 1); without it the guest's 9p client aliases /proc and /sys and its mounts vanish.
        argv += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=passthrough"
                 + (",readonly=on,multidevs=remap" if readonly else "")]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    output = results / "output.log"
    shown = 0
    boot_seconds: float | None = None
    try:
        while proc.poll() is None:
            if time.monotonic() - started > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise VmError(f"the guest did not finish within {timeout:.0f} s (hung?); console tail:\n"
                              f"{tail(console)}\nthe guest's last snapshot (heartbeat.log):\n"
                              f"{tail(results / 'heartbeat.log')}")
            if boot_seconds is None and (results / "booted").exists():
                boot_seconds = time.monotonic() - started
            if stream:
                shown = _show_new(output, shown)
            time.sleep(0.2)
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    if stream:
        _show_new(output, shown)
    qemu_out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    seconds = time.monotonic() - started
    status_file = results / "exit-status"
    if not status_file.exists():
        raise VmError(f"the guest ended without an exit status (qemu exit {proc.returncode}; kernel panic or "
                      f"a failure before the command ran); qemu: {qemu_out.strip()[-500:]}\nconsole tail:\n"
                      f"{tail(console)}")
    status = int(status_file.read_text().strip() or "255")
    return Result(status, seconds, boot_seconds, console, output)


def _show_new(path: Path, shown: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(shown)
            data = f.read()
    except FileNotFoundError:
        return shown
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return shown + len(data)
