"""The packaging inputs hold together without building anything: the Vagrant lab validates, its
provisioning script parses, the units and maintainer scripts name the paths the packages install.

Building and checking the packages themselves is ``packaging/build-deb``/``build-rpm`` (run by
scripts/test); this file catches the mistakes that need no build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAGRANT = ROOT / "vagrant"


def test_the_vagrantfile_validates(tmp_path: Path) -> None:
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is missing: scripts/bootstrap installs it"
    env = {**os.environ, "VAGRANT_CWD": str(VAGRANT), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
           "VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    done = subprocess.run([vagrant, "validate"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "validated successfully" in done.stdout, done.stdout + done.stderr
    assert not (VAGRANT / ".vagrant").exists()


def test_the_provisioning_script_parses_and_names_the_three_hosts() -> None:
    script = VAGRANT / "provision.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)
    hosts = set(re.findall(r'"(host-[a-z])" => "(192\.0\.2\.\d+)"', (VAGRANT / "Vagrantfile").read_text()))
    assert {h for h, _ in hosts} == {"host-a", "host-b", "host-c"}
    assert "for host in host-a host-b host-c" in script.read_text()


def test_the_units_run_the_wrappers_the_packages_install() -> None:
    stage = (ROOT / "packaging" / "stage").read_text()
    for unit, binary in (("veilnet-agent", "veilnet-agent"), ("veilnet-controller", "veilnet-controller")):
        text = (ROOT / "systemd" / f"{unit}.service").read_text()
        assert f"ExecStart=/usr/bin/{binary} " in text
        assert f"wrapper {binary} " in stage
    assert "wrapper veilctl " in stage


def test_the_controller_user_is_the_same_in_the_unit_sysusers_and_maintainer_scripts() -> None:
    unit = (ROOT / "systemd" / "veilnet-controller.service").read_text()
    sysusers = (ROOT / "packaging" / "sysusers" / "veilnet-controller.conf").read_text()
    postinst = (ROOT / "packaging" / "debian" / "veilnet-controller.postinst").read_text()
    assert "User=veilnet" in unit
    assert re.search(r"^u veilnet - .* /var/lib/veilnet-controller ", sysusers, re.M)
    assert "--home /var/lib/veilnet-controller" in postinst and " veilnet\n" in postinst
