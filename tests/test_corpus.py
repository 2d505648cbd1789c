"""Every checkpoint written by every released version restores here, and the
guest inside it comes back with its self-check clean and its counter going
on (the compatibility corpus, docs/compatibility.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cluster import ClusterBase
from vmigrate.migrate import snapfile
from vmigrate.vmm.testguest import report

CORPUS = Path(__file__).parent / "corpus"
CASES = [(d.name, f) for d in sorted(CORPUS.iterdir()) if d.is_dir()
         for f in json.loads((d / "manifest.json").read_text())["files"]]


class Local(ClusterBase):
    def __init__(self, home: Path) -> None:
        self.home = home


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="vmk", dir="/tmp"))
    c = Local(home)
    yield c
    c.run("down", check=False)
    shutil.rmtree(home, ignore_errors=True)


def test_the_corpus_has_the_first_release():
    assert "0.1.0" in {v for v, _ in CASES}


@pytest.mark.parametrize(("version", "name"), CASES)
def test_restores(local, tmp_path, version, name):
    src = CORPUS / version
    for f in src.iterdir():                 # a copy: the chain's relative paths come along
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / name
    snap, _ = snapfile.load(path)
    saved = report.parse(snap.console.decode())
    cpus = len(saved.heartbeats)
    vm = f"c{version.replace('.', '')}{name.split('.')[0].split('-')[-1]}{len(name)}"
    local.run("restore", str(path), "--name", vm)
    try:
        last = {c: saved.last(c).n for c in range(cpus)}
        r = local.wait_heartbeats(vm, 3, after=max(last.values()), cpus=cpus)
        assert r.clean(), (r.problems, r.gaps())
        for c in range(cpus):
            assert r.heartbeats[c][0].n <= last[c], "the console history came back too"
    finally:
        local.run("stop", vm, check=False)
