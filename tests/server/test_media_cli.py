"""``vramferry generate`` writes MP4 (H.264) for video pipelines, checked by decoding it."""

from __future__ import annotations

import io

import pytest

from vramferry.cli import main
from vramferry.server.generation import save_outputs

av = pytest.importorskip("av", reason="PyAV is in the cli extra")


def frames_of(path) -> list:
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name in ("h264", "vp9")
        return [frame.to_image() for frame in container.decode(video=0)]


@pytest.fixture
def tiny_wan(monkeypatch):
    from media_pipes import build_tiny_wan

    import vramferry.cli

    pipe = build_tiny_wan()
    monkeypatch.setattr(vramferry.cli, "load", lambda args, config=None: pipe)
    return pipe


def test_generate_writes_an_mp4_for_a_video_pipeline(tiny_wan, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [
        "generate",
        "--model",
        "tiny-wan",
        "--prompt",
        "dance",
        "--size",
        "32x16",
        "--frames",
        "9",
        "--steps",
        "2",
        "--fps",
        "8",
        "--offload",
        "none",
        "-q",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert "wrote vramferry.mp4" in capsys.readouterr().out  # the default name for a video pipeline
    frames = frames_of(tmp_path / "vramferry.mp4")
    assert len(frames) == 9 and {frame.size for frame in frames} == {(32, 16)}
    with av.open(str(tmp_path / "vramferry.mp4")) as container:
        assert container.streams.video[0].average_rate == 8


def test_save_outputs_writes_mp4_webm_and_gif(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (48, 32), (i * 30, 100, 200 - i * 30)) for i in range(5)]
    for suffix in (".mp4", ".webm"):
        (path,) = save_outputs([frames], tmp_path / f"clip{suffix}", fps=10)
        decoded = frames_of(path)
        assert len(decoded) == 5 and decoded[0].size == (48, 32)
    (gif,) = save_outputs([frames], tmp_path / "clip.gif", fps=10)
    from PIL import Image as PILImage

    assert PILImage.open(io.BytesIO(gif.read_bytes())).n_frames == 5


def test_odd_sides_are_written_in_yuv444(tmp_path, caplog):
    from PIL import Image

    frames = [Image.new("RGB", (33, 17), (i * 40, 0, 0)) for i in range(3)]
    (path,) = save_outputs([frames], tmp_path / "odd.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.pix_fmt, stream.width, stream.height) == ("yuv444p", 33, 17)
    assert "odd side" in caplog.text


def test_an_image_pipeline_refuses_a_video_suffix(tmp_path, capsys):
    out = tmp_path / "x.mp4"
    assert (
        main(["generate", "--out", str(out), "--steps", "1", "--size", "64x64", "-q", "--offload", "none"])
        == 2
    )
    err = capsys.readouterr().err
    assert "makes images" in err and "Traceback" not in err
    assert not out.exists()
