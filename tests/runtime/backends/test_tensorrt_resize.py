"""Video frames resized by the TensorRT frame-resize engine: its graph (on ONNX Runtime) gives
PIL's grey levels and uses only what TensorRT accepts; the backend's resizer (on the CPU
stand-in) gives the host path's model inputs and results."""

import numpy as np
import pytest

from mmsep.runtime import Separator
from mmsep.runtime import resize_engine
from mmsep.runtime.backends import create_backend
from mmsep.runtime.errors import ModelDirError
from mmsep.runtime.model_dir import ModelDir
from mmsep.runtime.resize import FrameResizer, clip_plan, resize_frames, sync_plan
from mmsep.runtime.pixels import YuvConversion, YuvFrames
from mmsep.runtime.resize_engine import engine_graph, engine_inputs, engine_profile, fits, \
    table_inputs
from tests.helpers import rel_l2
from tests.runtime.backends.fake_gpu import with_engines
from tests.runtime.media import decode_rgb

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
CLIP, SYNC = 384, 224
# the operators the graph may use: all in TensorRT's ONNX parser's support matrix
TENSORRT_OPS = {"Cast", "Transpose", "Gather", "MatMul", "Split", "Add", "Mul", "Floor", "Clip",
                "Reshape"}
YUV_OPS = {"Unsqueeze", "Shape", "Slice", "Concat"}  # the chroma upsampling's shape work


@pytest.fixture(scope="module")
def engine_session():
    return ort.InferenceSession(engine_graph(), providers=["CPUExecutionProvider"])


def run_graph(session, frames: np.ndarray, stream: str, size: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    return session.run(None, {"frames": frames,
                              **engine_inputs(stream, height, width, size)})[0]


@pytest.mark.parametrize("height,width", [(241, 321), (321, 241), (48, 64), (1080, 1920)])
def test_one_graph_gives_pils_grey_levels_at_every_resolution(engine_session, height, width):
    frames = np.random.default_rng(height).integers(0, 256, (3, height, width, 3), np.uint8)
    for stream, plan, size in (("clip", clip_plan(height, width, CLIP), CLIP),
                               ("sync", sync_plan(height, width, SYNC), SYNC)):
        assert fits(stream, height, width, size)
        # resize_frames's float64 passes equal PIL's grey levels (test_resize.py)
        np.testing.assert_array_equal(run_graph(engine_session, frames, stream, size),
                                      resize_frames(frames, plan))


def test_decoded_720p_frames_match_the_per_resolution_graph(engine_session, clip_720p):
    frames, _ = decode_rgb(clip_720p)
    frames = frames[:3]
    clip, segments = FrameResizer(ort, "cpu", 0, CLIP, SYNC).run(frames, np.arange(3),
                                                                 np.arange(3)[None])
    np.testing.assert_array_equal(run_graph(engine_session, frames, "clip", CLIP), clip.numpy())
    np.testing.assert_array_equal(run_graph(engine_session, frames, "sync", SYNC),
                                  segments.numpy()[0])


@pytest.mark.parametrize("yuv", [False, True])
def test_the_graph_uses_only_what_tensorrt_accepts(yuv):
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(engine_graph(yuv)))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    assert {node.op_type for node in graph.node} <= TENSORRT_OPS | (YUV_OPS if yuv else set())
    uint8 = {name for name, kind in types.items() if kind == onnx.TensorProto.UINT8}
    assert uint8 == ({"luma", "cb", "cr"} if yuv else {"frames"})  # uint8 only at the inputs
    for name in uint8:  # ... each read by one Cast to float
        readers = [node for node in graph.node if name in node.input]
        assert [(n.op_type, n.attribute[0].i) for n in readers] == \
            [("Cast", onnx.TensorProto.FLOAT)]
    assert onnx.TensorProto.DOUBLE not in types.values()  # no float64
    for node in graph.node:
        if node.op_type == "Gather":  # band indices and table indices are int32
            assert types[node.input[1]] == onnx.TensorProto.INT32
    assert [i.name for i in graph.input] == list(engine_profile(yuv))


def random_conversion(rng) -> YuvConversion:
    """Random int32 tables in swscale's range, under a key of their own (the runtime measures
    one conversion per key, so a key stands for its tables)."""
    key = tuple(int(k) for k in rng.integers(100, 1 << 30, 2))
    return YuvConversion(key, *(rng.integers(-300, 300, (256, 3)).astype(np.int32)
                                for _ in range(3)))


@pytest.mark.parametrize("height,width", [(241, 321), (240, 320), (33, 47)])
def test_the_yuv_graph_converts_as_the_host_then_resizes(height, width):
    session = ort.InferenceSession(engine_graph(True), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(width)
    conversion = random_conversion(rng)
    chroma = (2, -(-height // 2), -(-width // 2))  # odd sizes: the last chroma row/column
    planes = {"luma": rng.integers(0, 256, (2, height, width), np.uint8),
              "cb": rng.integers(0, 256, chroma, np.uint8),
              "cr": rng.integers(0, 256, chroma, np.uint8)}
    rgb = conversion.to_rgb(*planes.values())
    for stream, plan, size in (("clip", clip_plan(height, width, CLIP), CLIP),
                               ("sync", sync_plan(height, width, SYNC), SYNC)):
        got = session.run(None, {**planes, **table_inputs(conversion),
                                 **engine_inputs(stream, height, width, size)})[0]
        np.testing.assert_array_equal(got, resize_frames(rgb, plan))


def test_the_profile_takes_1080p_either_way_up_and_refuses_larger():
    for height, width in ((1080, 1920), (1920, 1080), (1920, 1920), (16, 16), (720, 1280)):
        assert fits("clip", height, width, CLIP) and fits("sync", height, width, SYNC)
    assert not fits("clip", 2160, 3840, CLIP)
    assert not fits("clip", 720, 1280, 200)  # not a whole number of bands


@pytest.fixture
def resizer(gpu, trt_dir):
    with create_backend(ModelDir(trt_dir), "trt") as backend:
        yield backend, backend.frame_resizer(CLIP, SYNC)


def expected(frames: np.ndarray, clip_index, sync_index):
    height, width = frames.shape[1:3]
    clip = resize_frames(frames[clip_index], clip_plan(height, width, CLIP))
    sync = resize_frames(frames[np.asarray(sync_index).reshape(-1)],
                         sync_plan(height, width, SYNC))
    return clip, sync.reshape(*np.shape(sync_index), *sync.shape[1:])


def random_upload(rng, count: int, height: int, width: int, yuv: bool):
    """(what WindowFrames uploads: RGB frames or YuvFrames, the RGB frames they stand for)."""
    if not yuv:
        frames = rng.integers(0, 256, (count, height, width, 3), np.uint8)
        return frames, frames
    conversion = random_conversion(rng)
    chroma = (count, -(-height // 2), -(-width // 2))
    planes = (rng.integers(0, 256, (count, height, width), np.uint8),
              rng.integers(0, 256, chroma, np.uint8), rng.integers(0, 256, chroma, np.uint8))
    return YuvFrames(*planes, conversion), conversion.to_rgb(*planes)


def test_the_backend_resizer_gives_the_hosts_model_inputs(resizer):
    backend, resizer = resizer
    assert resizer.takes_yuv
    rng = np.random.default_rng(5)
    runs = []
    for height, width, count, yuv in ((241, 321, 21, False), (72, 96, 4, True),
                                      (241, 321, 12, True), (72, 96, 5, False)):
        upload, frames = random_upload(rng, count, height, width, yuv)
        clip_index = rng.integers(0, count, 11)  # more than one engine call of MAX_FRAMES
        sync_index = np.minimum(np.arange(3)[:, None] * 2 + np.arange(4)[None, :], count - 1)
        sync_index[1, 2] = sync_index[1, 1]  # a repeated frame (a low frame rate)
        clip, segments = resizer.run(upload, clip_index, sync_index)
        assert (clip.shape, segments.shape) == ((11, 3, CLIP, CLIP), (3, 4, 3, SYNC, SYNC))
        runs.append(((clip, segments), expected(frames, clip_index, sync_index)))
    runs = runs[1:]  # the ring keeps the last three
    for (clip, segments), (want_clip, want_segments) in runs:
        np.testing.assert_array_equal(backend.to_host(clip), want_clip)
        np.testing.assert_array_equal(backend.to_host(segments), want_segments)


@pytest.mark.parametrize("engines, upload", [((False, True), "YuvFrames"), ((False,), "list")])
def test_video_through_the_engines_gives_the_host_path_result(gpu, model_dir, media, tmp_path,
                                                              monkeypatch, engines, upload):
    with Separator(model_dir, "ort-cpu") as cpu:
        host = cpu.process(video=media["av"], steps=2, seed=3)
    uploads = []
    with Separator(with_engines(model_dir, tmp_path / "trt", frame_resize=engines),
                   "trt") as sep:
        original = sep._resizer.run
        monkeypatch.setattr(sep._resizer, "run",
                            lambda *a: uploads.append(type(a[0]).__name__) or original(*a))
        device = sep.process(video=media["av"], steps=2, seed=3)
        assert uploads == [upload] * device.windows and device.windows == host.windows
        monkeypatch.setattr(resize_engine, "MAX_SIDE", 64)  # 96 x 128 is now beyond the engine
        beyond = sep.process(video=media["av"], steps=2, seed=3)
        assert len(uploads) == device.windows  # resized on the host
    assert rel_l2(device.audio, host.audio) < 1e-4 and rel_l2(beyond.audio, host.audio) < 1e-4


def test_videos_resized_together_keep_their_own_frames(gpu, model_dir, tmp_path):
    """process_many reads several videos at once, each one window ahead on its own thread,
    through the one resizer: calls run one at a time and every video's outputs have a ring of
    their own (a shared ring gave the short video the long one's frames)."""
    from mmsep.runtime.example import make_video

    long = make_video(tmp_path / "long.mp4", 6.0, fps=25, size=(48, 64), audio=None)
    short = make_video(tmp_path / "short.mp4", 2.0, fps=10, size=(48, 64), audio=None)
    requests = [dict(video=str(long), duration=6.0, generate=True, steps=1, seed=0, text="x"),
                dict(video=str(short), duration=2.0, generate=True, steps=1, seed=0, text="x")]
    with Separator(with_engines(model_dir, tmp_path / "trt"), "trt", max_batch=4) as sep:
        alone = [sep.process(**request) for request in requests]
        together = sep.process_many(requests)
        assert sep._resizer._lanes == {}  # every lane given back
    assert [type(r).__name__ for r in together] == ["SeparationResult"] * 2, together
    assert together[0].windows > 3 * together[1].windows
    for one, many in zip(alone, together):
        assert rel_l2(many.audio, one.audio) < 1e-5


def test_engines_built_before_the_resize_engines_resize_on_the_host(gpu, model_dir, tmp_path):
    older = with_engines(model_dir, tmp_path / "older", frame_resize=())
    with create_backend(ModelDir(older), "trt") as backend:
        assert backend.frame_resizer(CLIP, SYNC) is None
    rgb_only = with_engines(model_dir, tmp_path / "rgb", frame_resize=(False,))
    with create_backend(ModelDir(rgb_only), "trt") as backend:
        assert not backend.frame_resizer(CLIP, SYNC).takes_yuv  # YUV converted on the host


def test_a_tampered_resize_engine_is_refused(gpu, model_dir, tmp_path):
    tampered = with_engines(model_dir, tmp_path / "tampered")
    with (tampered / "frame_resize.engine").open("ab") as engine:
        engine.write(b"\0")
    with pytest.raises(ModelDirError, match=r"frame_resize.engine: \d+ bytes, the manifest "
                                            r"says \d+ \(tampered"):
        Separator(tampered, "trt")  # its size is checked before its hash, as a graph's
