"""The native extension's build folder (``native.build_directory``, ``native_cache``).

Its name carries a digest of the C++ sources; builds and loads in it are locked across processes;
a folder that another user could write is refused. All but the last test replace torch's compiler
driver (``cpp_extension.load``) with a stand-in, so they compile nothing; the slow ones at the end
build for real, once, in an empty folder.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils.cpp_extension

from fastrl_kernels import native, native_cache

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_compiler(monkeypatch):
    """torch's load replaced by a recorder; returns the list of its keyword arguments per call."""
    calls = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or "module")
    return calls


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A private copy of the C++ sources that ``native`` builds from."""
    copy = tmp_path / "checkout" / "csrc"
    shutil.copytree(native.source_dir(), copy)
    monkeypatch.setattr(native, "source_dir", lambda: copy)
    return copy


def _root(tmp_path, monkeypatch, mode=0o755) -> Path:
    root = tmp_path / "extensions"
    root.mkdir(exist_ok=True)
    root.chmod(mode)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def test_build_folder_name_changes_with_any_source_file_and_only_with_them(tmp_path, monkeypatch, sources):
    _root(tmp_path, monkeypatch)
    first = native.build_directory()
    assert first.parent == tmp_path / "extensions"
    assert first.name.startswith(f"fastrl_native_py{sys.version_info.major}{sys.version_info.minor}_torch")
    # Another checkout of the same sources, elsewhere: the same folder (its build is reused).
    other = tmp_path / "other" / "csrc"
    shutil.copytree(sources, other)
    monkeypatch.setattr(native, "source_dir", lambda: other)
    assert native.build_directory() == first
    for name in ("native.cpp", "row_kernels.h", "simd.h"):
        edited = tmp_path / f"edited-{name}" / "csrc"
        shutil.copytree(sources, edited)
        (edited / name).write_bytes((edited / name).read_bytes() + b"\n// edited\n")
        monkeypatch.setattr(native, "source_dir", lambda edited=edited: edited)
        assert native.build_directory() != first, name


def test_build_runs_from_a_copy_of_the_sources_inside_the_build_folder(tmp_path, monkeypatch, sources, fake_compiler):
    _root(tmp_path, monkeypatch)
    assert native._build() == "module"
    directory = native.build_directory()
    (call,) = fake_compiler
    assert call["build_directory"] == str(directory)
    assert call["sources"] == [str(directory / "src" / "native.cpp")]
    assert call["extra_include_paths"] == [str(directory / "src")]
    for name in ("native.cpp", "row_kernels.h", "simd.h"):
        assert (directory / "src" / name).read_bytes() == (sources / name).read_bytes()
    assert (directory / "fastrl_sources.sha256").read_text().startswith(directory.name.rsplit("_", 1)[1])


def test_a_finished_build_is_loaded_as_it_is_and_an_unfinished_one_is_built(
    tmp_path, monkeypatch, sources, fake_compiler
):
    _root(tmp_path, monkeypatch)
    imported = []
    monkeypatch.setattr(native, "_import_library", lambda name, path: imported.append(path) or "library")
    assert native._build() == "module"  # first use: torch builds it
    directory = native.build_directory()
    library = directory / f"fastrl_native_{native.isa()}.so"
    assert native._build() == "module"  # no library on disk (the stand-in wrote none): torch again
    library.write_bytes(b"")
    # Stamp and library there: loaded without torch (whose ninja could rebuild it for nothing).
    assert native._build() == "library" and imported == [library] and len(fake_compiler) == 2
    (directory / "fastrl_sources.sha256").unlink()  # a build that never finished
    assert native._build() == "module" and len(fake_compiler) == 3


def test_a_stale_torch_lock_file_from_a_killed_build_does_not_block_the_next_one(
    tmp_path, monkeypatch, sources, fake_compiler
):
    _root(tmp_path, monkeypatch)
    directory = native.build_directory()
    native_cache.make_directory(directory)
    # What a build killed inside torch's cpp_extension.load leaves: torch would wait on it forever.
    (directory / native_cache.TORCH_BATON_NAME).touch()
    monkeypatch.setattr(
        torch.utils.cpp_extension,
        "load",
        lambda **kwargs: "module" if not (directory / native_cache.TORCH_BATON_NAME).exists() else "blocked",
    )
    assert native._build() == "module"


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o770])
def test_a_root_folder_others_can_write_is_refused_naming_it_and_the_fix(
    tmp_path, monkeypatch, sources, fake_compiler, mode
):
    root = _root(tmp_path, monkeypatch, mode)
    with pytest.raises(native_cache.UnsafeBuildDirectory) as error:
        native._build()
    message = str(error.value)
    assert f"{root}, above {native.build_directory()}, can be written by other users" in message
    assert "TORCH_EXTENSIONS_DIR" in message and "chmod go-w" in message
    assert fake_compiler == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_a_build_folder_others_can_write_is_refused(tmp_path, monkeypatch, sources, fake_compiler, mode):
    _root(tmp_path, monkeypatch)
    directory = native.build_directory()
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(native_cache.UnsafeBuildDirectory, match=f"{directory} can be written by other users"):
        native._build()
    assert fake_compiler == []


def test_a_sticky_shared_root_is_accepted_for_a_folder_we_own(tmp_path, monkeypatch, sources, fake_compiler):
    root = _root(tmp_path, monkeypatch, 0o1777)  # like /tmp
    assert native._build() == "module"
    assert stat.S_IMODE(native.build_directory().stat().st_mode) == 0o755
    assert root.stat().st_mode & stat.S_ISVTX


def test_a_symlink_into_a_folder_others_can_write_is_refused(tmp_path, monkeypatch, sources, fake_compiler):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "ext").mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(shared / "ext")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(link))
    with pytest.raises(native_cache.UnsafeBuildDirectory, match=f"{shared}, above"):
        native._build()
    assert fake_compiler == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
@pytest.mark.parametrize("sticky_root", [False, True])
def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch, sources, fake_compiler, sticky_root):
    _root(tmp_path, monkeypatch, 0o1777 if sticky_root else 0o755)
    directory = native.build_directory()
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    with pytest.raises(native_cache.UnsafeBuildDirectory, match=f"{directory} belongs to another user"):
        native._build()
    assert fake_compiler == []


def test_folders_it_creates_are_writable_by_their_owner_only_whatever_the_umask(
    tmp_path, monkeypatch, sources, fake_compiler
):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "a" / "b"))
    old = os.umask(0o002)  # user-private groups: new folders would be group-writable
    try:
        assert native._build() == "module"
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", native.build_directory()):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder


def test_the_build_command_reports_a_refused_folder_and_compiles_nothing(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    result = subprocess.run(
        [sys.executable, "-m", "fastrl_kernels.native", "build"],
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert f"refusing to build or load the C++ extension in {root}/fastrl_native_" in result.stderr
    assert "Set TORCH_EXTENSIONS_DIR to a folder that only you can write" in result.stderr
    assert not list(root.rglob("*.so")) and not list(root.rglob("*.o"))


_RACER = """
import os, sys, time
from pathlib import Path
import torch.utils.cpp_extension
from fastrl_kernels import native

work, me, racers = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

def load(**kwargs):
    os.close(os.open(work / "inside", os.O_CREAT | os.O_EXCL))  # FileExistsError if two are inside
    deadline = time.time() + 60
    while len(list(work.glob("arrived-*"))) < racers and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # every other racer is now at the lock
    os.remove(work / "inside")
    return "module"

torch.utils.cpp_extension.load = load
(work / f"arrived-{me}").touch()
print(native._build())
"""


def test_first_uses_from_several_processes_take_turns(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    racers = [
        subprocess.Popen([sys.executable, str(script), str(tmp_path), str(i), "3"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    results = [(proc.wait(timeout=300), *proc.communicate()) for proc in racers]
    assert [(rc, out.strip()) for rc, out, _ in results] == [(0, "module")] * 3, [err for _, _, err in results]
    errs = [err for _, _, err in results]
    # One compiles (and says so); the others wait for it, say that, and then only load.
    assert sum("compiling the C++ backend for" in err for err in errs) == 1, errs
    assert sum("waiting for another process compiling" in err for err in errs) == 2, errs


# ---- real builds (about a minute of compiling on two cores) ----

_USER = """
import hashlib, sys
import torch
from fastrl_kernels import native
from fastrl_kernels.core import CoreParams
g = torch.Generator().manual_seed(5)
z = torch.randn(64, 3001, generator=g) * 3
y = torch.randint(0, 3001, (64,), generator=g)
s = native.stats(z, y, CoreParams(temperature=0.8))
print(hashlib.sha256(s.logp.numpy().tobytes() + s.entropy.numpy().tobytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def raced_build(tmp_path_factory):
    if not native.is_available():
        pytest.skip("the native extension cannot be built here")
    work = tmp_path_factory.mktemp("raced")
    script = work / "user.py"
    script.write_text(_USER)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(work / "extensions")}
    users = [
        subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [(proc.wait(timeout=900), *proc.communicate()) for proc in users]
    return script, env, results


@pytest.mark.slow
@pytest.mark.native
def test_three_processes_using_an_empty_build_folder_at_once_all_succeed_alike(raced_build):
    _, _, results = raced_build
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    digests = {out.strip() for _, out, _ in results}
    assert len(digests) == 1, digests
    assert sum("compiling the C++ backend for" in err for _, _, err in results) == 1


@pytest.mark.slow
@pytest.mark.native
def test_a_real_build_loads_again_past_a_stale_torch_lock_without_compiling(raced_build):
    script, env, results = raced_build
    (directory,) = Path(env["TORCH_EXTENSIONS_DIR"]).iterdir()
    (directory / native_cache.TORCH_BATON_NAME).touch()
    again = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == results[0][1].strip()
    assert "compiling" not in again.stderr
    assert not (directory / native_cache.TORCH_BATON_NAME).exists()
