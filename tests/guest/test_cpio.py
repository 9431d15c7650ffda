"""The newc cpio writer, read back by an independent parser and by busybox."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfactory.guest.cpio import CpioWriter

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="/bin/busybox not present")

ODD = b"hello, initramfs!"  # 17 bytes: needs 3 bytes of padding
SCRIPT = b"#!/bin/sh\nexec /bin/busybox sh\n"


def sample_archive() -> bytes:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    for d in ("bin", "dev", "etc", "lib/modules"):
        cpio.add_dir(d)
    cpio.add_dir("root", 0o700)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_file("etc/motd", ODD)
    cpio.add_file("init", SCRIPT, 0o755)
    cpio.add_file("etc/empty", b"")
    cpio.add_symlink("bin/sh", "busybox")
    cpio.close()
    return out.getvalue()


EXPECTED_NAMES = ["bin", "dev", "etc", "lib/modules", "root", "dev/console", "etc/motd", "init",
                  "etc/empty", "bin/sh", "TRAILER!!!"]


def test_roundtrip_names_modes_sizes_contents(read_newc: Callable) -> None:
    entries = read_newc(sample_archive())
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries] == EXPECTED_NAMES

    for d in ("bin", "dev", "etc", "lib/modules"):
        assert by_name[d].mode == stat.S_IFDIR | 0o755
        assert by_name[d].fields["filesize"] == 0
    assert by_name["root"].mode == stat.S_IFDIR | 0o700

    motd = by_name["etc/motd"]
    assert motd.mode == stat.S_IFREG | 0o644
    assert motd.fields["filesize"] == len(ODD) and motd.data == ODD

    init = by_name["init"]
    assert init.mode == stat.S_IFREG | 0o755 and init.data == SCRIPT
    assert by_name["etc/empty"].data == b"" and stat.S_ISREG(by_name["etc/empty"].mode)

    link = by_name["bin/sh"]
    assert stat.S_ISLNK(link.mode) and stat.S_IMODE(link.mode) == 0o777
    assert link.data == b"busybox"  # the target, without a NUL

    console = by_name["dev/console"]
    assert console.mode == stat.S_IFCHR | 0o600
    assert (console.fields["rdevmajor"], console.fields["rdevminor"]) == (5, 1)
    assert console.fields["filesize"] == 0


def test_header_fields_are_reproducible(read_newc: Callable) -> None:
    blob = sample_archive()
    assert blob == sample_archive(), "same entries must give identical bytes"
    entries = read_newc(blob)
    inodes = [e.fields["ino"] for e in entries[:-1]]
    assert len(set(inodes)) == len(inodes), "inode numbers must be unique"
    for e in entries:
        assert e.fields["uid"] == e.fields["gid"] == 0
        assert e.fields["mtime"] == 0
        assert e.fields["check"] == 0
        assert e.fields["namesize"] == len(e.name.encode()) + 1
        if e.name != "dev/console":
            assert e.fields["rdevmajor"] == e.fields["rdevminor"] == 0


def test_trailer_is_last_and_empty(read_newc: Callable) -> None:
    blob = sample_archive()
    trailer = read_newc(blob)[-1]
    assert trailer.name == "TRAILER!!!"
    assert trailer.fields["filesize"] == 0 and trailer.fields["mode"] == 0
    assert len(blob) % 4 == 0


def test_close_is_idempotent(read_newc: Callable) -> None:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    cpio.add_file("a", b"1")
    cpio.close()
    once = out.getvalue()
    cpio.close()
    assert out.getvalue() == once
    assert [e.name for e in read_newc(once)] == ["a", "TRAILER!!!"]


def test_empty_archive_is_just_a_trailer(read_newc: Callable) -> None:
    out = io.BytesIO()
    CpioWriter(out).close()
    assert [e.name for e in read_newc(out.getvalue())] == ["TRAILER!!!"]


def test_writes_through_gzip(read_newc: Callable, tmp_path: Path) -> None:
    # The image builder streams the archive through gzip.open().
    path = tmp_path / "initrd.img"
    with gzip.open(path, "wb") as gz:
        cpio = CpioWriter(gz)  # type: ignore[arg-type]
        cpio.add_file("init", SCRIPT, 0o755)
        cpio.close()
    entries = read_newc(gzip.decompress(path.read_bytes()))
    assert entries[0].name == "init" and entries[0].data == SCRIPT


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-/", min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(names, st.binary(max_size=70), st.integers(0, 0o777)), max_size=8))
def test_roundtrip_property(read_newc: Callable, files: list[tuple[str, bytes, int]]) -> None:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    for name, data, perm in files:
        cpio.add_file(name, data, perm)
    cpio.close()
    entries = read_newc(out.getvalue())
    assert [(e.name, e.data, e.mode) for e in entries[:-1]] == [
        (name, data, stat.S_IFREG | perm) for name, data, perm in files]


@needs_busybox
def test_busybox_lists_same_names(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(sample_archive())
    proc = subprocess.run([str(BUSYBOX), "cpio", "-t", "-F", str(archive)],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == EXPECTED_NAMES[:-1]


@needs_busybox
def test_busybox_verbose_listing_shows_types(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(sample_archive())
    proc = subprocess.run([str(BUSYBOX), "cpio", "-tv", "-F", str(archive)],
                          capture_output=True, text=True, check=True)
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in proc.stdout.splitlines() if not line.endswith("blocks")}
    assert lines["dev/console"].startswith("crw-------")
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> busybox")
    assert lines["root"].startswith("drwx------")


@needs_busybox
def test_busybox_extracts_files_and_symlinks(tmp_path: Path) -> None:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    cpio.add_dir("etc")
    cpio.add_file("etc/motd", ODD)
    cpio.add_file("init", SCRIPT, 0o755)
    cpio.add_symlink("sh", "init")
    cpio.close()
    dest = tmp_path / "root"
    dest.mkdir()
    subprocess.run([str(BUSYBOX), "cpio", "-i", "-d"], input=out.getvalue(), cwd=dest,
                   capture_output=True, check=True)
    assert (dest / "etc/motd").read_bytes() == ODD
    assert (dest / "init").read_bytes() == SCRIPT
    assert stat.S_IMODE((dest / "init").stat().st_mode) == 0o755
    assert os.readlink(dest / "sh") == "init"
