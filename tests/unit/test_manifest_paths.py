"""A local augmentation manifest names images inside its own folder only: nothing else on the machine
(``/etc/...``, ``../``, a symbolic link leading out) is read or uploaded to the run's inputs; and an
export writes only inside its folder, whatever the bucket's metadata.jsonl says."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkroom.producer.augment.sources import list_sources
from darkroom.producer.augment.spec import InvalidSpecError


def refused(manifest: Path) -> dict[str, str]:
    with pytest.raises(InvalidSpecError) as caught:
        list_sources(str(manifest), "s3://bkt/run/_augment/inputs", store=None)  # type: ignore[arg-type]
    return {e.field: f"{e.message}; allowed: {e.allowed}" for e in caught.value.errors}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    inside = tmp_path / "data"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.png").write_bytes(b"png-a")
    (inside / "sub" / "b.png").write_bytes(b"png-b")
    (tmp_path / "secret.png").write_bytes(b"not yours")
    (inside / "out.png").symlink_to(tmp_path / "secret.png")
    return inside


@pytest.mark.parametrize("image", ["/etc/passwd", "../secret.png", "sub/../../secret.png", "out.png",
                                   str(Path("/etc/hostname"))])
def test_a_path_outside_the_manifests_folder_is_refused(folder: Path, image: str) -> None:
    (folder / "m.jsonl").write_text(f'{{"image": "a.png"}}\n{{"image": "{image}"}}\n')
    errors = refused(folder / "m.jsonl")
    assert list(errors) == ["sources[1].image"]
    assert "outside the manifest's folder" in errors["sources[1].image"]
    assert "stays inside it" in errors["sources[1].image"]


def test_paths_inside_the_folder_are_listed_under_their_relative_names(folder: Path) -> None:
    (folder / "m.csv").write_text("image,prompt\na.png,x\nsub/b.png,y\n./sub/../a.png,z\n")
    found = list_sources(str(folder / "m.csv"), "s3://bkt/in", store=None)  # type: ignore[arg-type]
    assert [(s.name, s.uri) for s in found] == [("a.png", "s3://bkt/in/a.png"), ("sub/b.png", "s3://bkt/in/sub/b.png"),
                                               ("a.png", "s3://bkt/in/a.png")]
    assert found[1].local_path == (folder / "sub" / "b.png").resolve()


def test_a_relative_image_beside_an_s3_manifest_may_not_climb_or_be_absolute(folder: Path) -> None:
    from darkroom.producer.augment.sources import _manifest_source

    for image in ("../other/x.png", "/etc/x.png", "a//b.png"):
        with pytest.raises(InvalidSpecError) as caught:
            _manifest_source(0, {"image": image}, "s3://bkt/manifests/m.jsonl", "s3://bkt/in", store=None)  # type: ignore[arg-type]
        assert caught.value.errors[0].field == "sources[0].image", image


class _Bucket:
    """The one call export makes of object storage: get_bytes by key (a narrow stand-in)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_bytes(self, uri: object) -> bytes:
        return self.objects[uri.key]  # type: ignore[attr-defined]


@pytest.mark.parametrize("file_name", ["../evil.png", "/tmp/darkroom-export-evil/evil.png", "a/../../evil.png", ""])
def test_an_export_writes_only_inside_its_folder_whatever_metadata_jsonl_says(tmp_path: Path, file_name: str) -> None:
    """metadata.jsonl is read back from the bucket: whoever can write there must not pick local paths."""
    from darkroom.common.errors import DarkroomError
    from darkroom.producer.augment.dataset import export

    rows = [{"file_name": "ok/000.png"}, {"file_name": file_name}]
    bucket = _Bucket({"run/metadata.jsonl": "".join(f'{{"file_name": "{r["file_name"]}"}}\n' for r in rows).encode(),
                      "run/ok/000.png": b"png", "run/evil.png": b"evil"})
    target = tmp_path / "export"
    with pytest.raises(DarkroomError, match="not inside"):
        export("s3://bkt/run", target, bucket)  # type: ignore[arg-type]
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/darkroom-export-evil").exists()
    assert not target.exists(), "nothing is written once one row is refused"


def test_an_export_of_plain_names_writes_them_under_the_folder(tmp_path: Path) -> None:
    from darkroom.producer.augment.dataset import export

    bucket = _Bucket({"run/metadata.jsonl": b'{"file_name": "ok/000.png"}\n', "run/ok/000.png": b"png"})
    assert export("s3://bkt/run", tmp_path / "export", bucket) == 1  # type: ignore[arg-type]
    assert (tmp_path / "export" / "ok" / "000.png").read_bytes() == b"png"
