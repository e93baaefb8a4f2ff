"""The report's daemon side, in process: reading edited captions back (confined), bad
input (an empty folder, failed images, non-UTF-8 sidecars, a 1 MB caption), the lazy
and background checks, and the perceptual-hash pass over real image files."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from daemon.config import Settings
from daemon.hashing import content_hash, sidecar_hash
from daemon.pipeline.images import FULL_SIZE, decode_image
from daemon.queue import CaptionRecord, Database, FileIndex, JobQueue
from daemon.report import phash as ph
from daemon.report.service import Maintainer, ReportService, ScopeError
from daemon.report.stats import Options


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some structure, so pHashes differ by picture
        for y in range(0, size[1], 8):
            if (x // 8 + y // 8) % 3 == 0:
                img.putpixel((x, y), (255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


class World:
    def __init__(self, tmp: Path, **report: object) -> None:
        self.root = tmp / "ds"
        self.root.mkdir()
        self.settings = Settings(
            state_dir=tmp / "state",
            cache_dir=tmp / "cache",
            watch=[{"path": str(self.root), "name": "ds", "trigger_word": "sks"}],
            report=report,
        )
        self.db = Database(tmp / "q.db")
        self.index = FileIndex(self.db)
        self.queue = JobQueue(self.db)
        self.service = ReportService(settings=self.settings, index=self.index, queue=self.queue)

    def image(self, rel: str, data: bytes, caption: str | None = None, gen: str = "wd_tagger",
              ext: str = "txt") -> str:  # fmt: skip
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        d, _, name = rel.rpartition("/")
        self.index.upsert_files(str(self.root), [(d, name, len(data), 1)])
        if caption is not None:
            side = path.with_suffix("." + ext)
            side.write_text(caption + "\n")
            self.index.record_captions([CaptionRecord(
                str(path), gen, content_hash(data), str(side),
                sidecar_hash((caption + "\n").encode()), 0.0, text=caption,
            )])  # fmt: skip
        return str(path)

    def report(self, **kw: object) -> dict:
        return self.service.report([], Options(**kw))  # type: ignore[arg-type]


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    yield w
    w.db.close()


# -- captions edited on disk -------------------------------------------------------------


def test_refresh_reads_edited_captions_back_and_keeps_ownership(world: World) -> None:
    a = world.image("a.png", png((200, 0, 0)), "sks, 1girl, solo")
    world.image("b.png", png((0, 200, 0)), "sks, 1boy, solo")
    before = world.index.get_caption(a, "wd_tagger")
    (world.root / "a.txt").write_text("sks, 1girl, solo, edited by hand\n")
    assert world.service.refresh([]) == {
        "sidecars": 2, "edited": 1, "missing": 0, "refused": 0, "not_utf8": 0,
    }  # fmt: skip
    after = world.index.get_caption(a, "wd_tagger")
    assert after.text == "sks, 1girl, solo, edited by hand"
    assert after.sidecar_hash == before.sidecar_hash  # ownership is not the report's business
    r = world.report()
    assert r["texts"]["read_back_after_edit"] == 1
    assert r["coverage"]["by_person"]["edited_after_captiond"] == 1
    assert any(t["tag"] == "edited by hand" for t in r["tags"]["top"])
    # read again: nothing new to read back
    assert world.service.refresh([])["edited"] == 0
    assert world.index.get_caption(a, "wd_tagger").text.endswith("edited by hand")


def test_refresh_refuses_links_big_files_and_survives_bad_bytes(
    world: World, tmp_path: Path
) -> None:
    world.image("a.png", png((200, 0, 0)), "sks, 1girl")
    world.image("b.png", png((0, 200, 0)), "sks, 1boy")
    world.image("c.png", png((0, 0, 200)), "sks, cat")
    world.image("d.png", png((9, 9, 9)), "sks, dog")
    (world.root / "a.txt").write_bytes(b"sks, \xff\xfe caf\xe9\n")  # Latin-1, not UTF-8
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the root\n")
    (world.root / "b.txt").unlink()
    (world.root / "b.txt").symlink_to(secret)
    (world.root / "c.txt").write_bytes(b"x" * (1024 * 1024 + 1))
    (world.root / "d.txt").unlink()
    counts = world.service.refresh(["ds"])
    assert counts == {"sidecars": 4, "edited": 1, "missing": 1, "refused": 2, "not_utf8": 1}
    rows = {r[0].rsplit("/", 1)[1]: r[6] for r in world.index.report_captions(str(world.root))}
    assert rows["a.png"] == "sks, \ufffd\ufffd caf\ufffd"
    assert rows["b.png"] == "sks, 1boy"  # the link was never read
    r = world.report()  # and the report is fine with all of it
    assert r["coverage"]["captioned"] == 4


# -- bad input ---------------------------------------------------------------------------


def test_an_empty_folder(world: World) -> None:
    r = world.report()
    assert r["coverage"]["images"] == 0
    assert r["tags"]["trigger"] == [] and r["flags"]["open"] == 0
    (world.root / "empty").mkdir()
    r = world.service.report(["ds/empty"], Options())
    assert r["scope"][0]["folder"] == "empty" and r["coverage"]["images"] == 0


def test_a_folder_of_failed_images(world: World) -> None:
    for i in range(3):
        path = world.image(f"bad/{i}.png", b"not an image")
        world.queue.enqueue(path, "wd_tagger", 0)
        (job,) = world.queue.claim("wd_tagger", 1)
        world.queue.fail(job.id, "bad_image", "not a recognised image format", False)
    path = world.image("bad/empty.png", png((1, 2, 3)))
    world.queue.enqueue(path, "vlm", 0)
    (job,) = world.queue.claim("vlm", 1)
    world.queue.fail(job.id, "generation", "vlm produced an empty caption", False)
    r = world.service.report(["ds/bad"], Options())
    assert r["coverage"]["images"] == 4 and r["coverage"]["no_caption"] == 4
    assert r["coverage"]["failed"]["failed"] == {"bad_image": 3, "generation": 1}
    assert r["coverage"]["empty_after_post_processing"] == 1
    assert r["images"]["without_size"] == 4


def test_a_one_megabyte_caption(world: World) -> None:
    huge = "sks, " + "a very long caption " * 52_000  # ~1 MB
    world.image("big.png", png((5, 5, 5)), huge, gen="vlm", ext="caption")
    world.image("big.png", png((5, 5, 5)), "sks, 1girl, solo")
    started = time.monotonic()
    r = world.report()
    assert time.monotonic() - started < 20
    vlm = r["length"]["by_generator"]["vlm"]
    assert vlm["over_clip_limit"] == 1 and vlm["words"]["max"] > 200_000
    assert r["flags"]["by_check"]["repetition"]["open"] == 1


def test_scopes_are_checked(world: World) -> None:
    with pytest.raises(ScopeError, match="no watched root"):
        world.service.scopes(["nope"])
    for bad in ["ds/../x", "/etc", "ds//x", "ds/\x00"]:
        with pytest.raises(ScopeError):
            world.service.scopes([bad])
    assert world.service.scopes(["_"])[0].name == "ds"  # the only root


# -- checks: lazy in the report, and in the background -----------------------------------


def test_the_report_checks_what_changed_first(world: World) -> None:
    img = world.image("a.png", png((200, 0, 0)), "sks, 1girl, solo")
    world.image("a.png", png((200, 0, 0)), "sks, A man reads.", gen="vlm", ext="caption")
    r = world.report()
    assert r["flags"]["checked_now"] == 1
    assert r["flags"]["list"][0]["check"] == "gender"
    assert world.service.flag_status() == {"open": 1, "dismissed": 0, "by_check": {"gender": 1}}
    assert world.report()["flags"]["checked_now"] == 0  # nothing changed since
    assert world.service.dismiss(img, "vlm", "gender") == 1
    assert world.service.flag_status()["dismissed"] == 1


def test_checks_off_in_the_configuration(tmp_path: Path) -> None:
    w = World(tmp_path, checks=False)
    try:
        w.image("a.png", png((200, 0, 0)), "sks, 1girl, solo")
        w.image("a.png", png((200, 0, 0)), "sks, A man reads.", gen="vlm", ext="caption")
        r = w.report()
        assert r["flags"]["open"] == 0 and r["flags"]["checks_enabled"] is False
    finally:
        w.db.close()


def test_the_background_pass_checks_what_the_worker_wrote(world: World) -> None:
    a = world.image("a.png", png((200, 0, 0)), "sks, 1girl, solo")
    world.image("a.png", png((200, 0, 0)), "sks, A man reads.", gen="vlm", ext="caption")
    m = Maintainer(world.service, interval=3600)
    m.service.check_stale = lambda *a, **k: (0, 0)  # type: ignore[method-assign]  # only notify
    m.start()
    try:
        time.sleep(0.3)
        assert world.service.flag_status()["open"] == 0
        m.notify([(a, "vlm", "written", "sks, A man reads.")])
        wait(lambda: world.service.flag_status()["open"] == 1)
        # a caption captiond found edited: its text is kept for reports
        m.notify([(a, "wd_tagger", "caption_edited", "sks, 1boy, solo\n")])
        wait(lambda: world.index.get_caption(a, "wd_tagger").text == "sks, 1boy, solo")
        wait(lambda: world.service.flag_status()["open"] == 0)  # now consistent
    finally:
        m.stop()
    assert not m.alive


def wait(pred: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# -- perceptual hashes -------------------------------------------------------------------


def jpeg(size: tuple[int, int], exif_orientation: int | None = None) -> bytes:
    img = Image.new("RGB", size, (30, 120, 200))
    for x in range(0, size[0], size[0] // 8):
        for y in range(size[1] // 3):
            img.putpixel((x, y), (255, 255, 0))
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    img.save(buf, "JPEG", quality=85, exif=exif.tobytes())
    return buf.getvalue()


def test_full_size_survives_a_draft_and_exif_orientation() -> None:
    data = jpeg((4000, 3000))
    img = decode_image(data, draft_size=448, draft_longer_side=True)
    assert img.size == (1000, 750) and img.info[FULL_SIZE] == (4000, 3000)  # drafted to 1/4
    turned = decode_image(jpeg((4000, 3000), exif_orientation=6), draft_size=448)
    assert turned.info[FULL_SIZE] == (3000, 4000) and turned.size[0] < turned.size[1]


def picture(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """Large shapes: a picture whose pHash survives resizing."""
    from PIL import ImageDraw

    img = Image.new("RGB", (256, 192), colour)
    d = ImageDraw.Draw(img)
    d.ellipse((20, 20, 140, 170), fill=(250, 240, 200))
    d.rectangle((160, 40, 240, 120), fill=(20, 20, 60))
    return img.resize(size)


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_the_hash_pass_once_per_content(world: World) -> None:
    base = encoded(picture((256, 192), (200, 30, 30)))
    small = encoded(picture((256, 192), (200, 30, 30)).resize((128, 96)), "JPEG")
    world.image("a.png", base, "1girl")
    world.image("copy.png", base, "1girl")  # the same content: hashed once
    world.image("small.jpg", small, "1girl")  # a smaller JPEG copy: a near duplicate
    other = picture((256, 192), (20, 220, 20)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    world.image("other.png", encoded(other), "1boy")
    world.image("big.jpg", jpeg((2400, 1800)), "scenery")
    world.image("broken.png", b"\x89PNG\r\n\x1a\n garbage", "x")
    gone = world.image("gone.png", png((1, 1, 1)), "y")
    os.unlink(gone)
    stats = ph.HashPass(world.index, world.settings.watch_for).run()
    assert (stats.contents, stats.hashed, stats.unreadable, stats.skipped) == (6, 4, 1, 1)
    digests = {r[2] for r in world.index.report_captions(str(world.root))}
    facts = world.index.image_facts(digests)
    assert facts[content_hash(jpeg((2400, 1800)))][:2] == (2400, 1800)  # full size, not draft
    assert facts[content_hash(b"\x89PNG\r\n\x1a\n garbage")][2] == ""
    gone_hash = content_hash(png((1, 1, 1)))
    again = ph.HashPass(world.index, world.settings.watch_for, skip={gone_hash})
    assert again.run().hashed == 0  # nothing left to hash
    r = world.report(near_distance=6)
    near = r["images"]["near_duplicates"]
    assert (near["hashed"], near["unreadable"]) == (4, 1)
    groups = [sorted(g["paths"]) for g in near["list"]]
    assert ["ds/a.png", "ds/copy.png", "ds/small.jpg"] in groups
    assert not any("ds/other.png" in g for g in groups)
    assert r["images"]["exact_duplicates"]["list"][0]["paths"] == ["ds/a.png", "ds/copy.png"]


def test_the_hash_pass_reads_only_inside_the_root(world: World, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    data = png((10, 200, 10))
    outside.write_bytes(data)
    link = world.root / "link.png"
    link.symlink_to(outside)
    world.index.upsert_files(str(world.root), [("", "link.png", len(data), 1)])
    rec = CaptionRecord(str(link), "wd_tagger", content_hash(data), str(world.root / "link.txt"),
                        "s", 0.0, text="x")  # fmt: skip
    world.index.record_captions([rec])
    stats = ph.HashPass(world.index, world.settings.watch_for).run()
    assert stats.hashed == 0 and stats.skipped == 1  # follow_symlinks="inside" refuses it


def test_a_pass_stops_when_asked(world: World) -> None:
    for i in range(5):
        world.image(f"{i}.png", png((i * 40, 0, 0)), "x")
    stop = threading.Event()
    stop.set()
    stats = ph.HashPass(world.index, world.settings.watch_for, stop=stop).run()
    assert stats.stopped and stats.hashed == 0
