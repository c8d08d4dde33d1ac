"""The Gradio demo: image, video and robustness tabs on top of the shared :class:`~blindnet.inference.Predictor`.

What each tab computes lives in plain functions (:mod:`blindnet.demo.views`, :mod:`blindnet.demo.video`) that tests
call without a browser; this module only builds the page: one builder per tab, and :class:`DemoCallbacks` adapting
component values to those functions. Inputs arrive unpreprocessed (``preprocess=False``) so that a bad upload reaches
*our* decoder and turns into a readable message (``gr.Error``) instead of Gradio's generic processing error.
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from blindnet.demo.styles import STYLES
from blindnet.demo.video import DEFAULT_MAX_VIDEO_FRAMES, DEFAULT_MAX_VIDEO_SIDE, VideoError, process_video
from blindnet.demo.views import (
    READING_GUIDE,
    KnownLabels,
    class_colours,
    compare_style,
    describe_predictor,
    legend_view,
    read_image_upload,
    segment_image,
)
from blindnet.inference import Prediction, Predictor
from blindnet.io import ImageError

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
#: output files older than this are swept from the demo's own output folder
OUTPUT_TTL_S = 3600.0
NO_MODEL = "(none)"
LEGEND_WIDTHS: list[str | int] = ["22%", "48%", "30%"]
#: one inference at a time across tabs (one model, often one GPU)
COMMON_EVENT = {"concurrency_id": "inference", "concurrency_limit": 1, "preprocess": False}

CSS = """
.bn-legend table td:first-child { width: 2.2em; }
#bn-header h1 { margin-bottom: 0.1em; }
"""


def default_examples() -> list[Path]:
    """The example images shipped in ``demo/examples`` (sorted), or none."""
    return sorted(EXAMPLES_DIR.glob("*.png")) if EXAMPLES_DIR.is_dir() else []


def default_video_examples() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix in (".mp4", ".webm")) if EXAMPLES_DIR.is_dir() else []


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into ``gr.Error`` messages and unexpected ones into a short message plus a log entry,
    so the page never shows a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ImageError, VideoError) as exc:
            raise gr.Error(str(exc), title="Bad upload", print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the UI must stay usable; details go to the server log
            log.exception("demo callback %s failed", fn.__name__)
            raise gr.Error(
                f"{type(exc).__name__}: {exc}", title="Something went wrong", print_exception=False
            ) from None

    return wrapper


def _video_path(upload: Any) -> str | None:
    if upload is None:
        return None
    if isinstance(upload, dict):  # unpreprocessed gr.Video payload (Gradio 6: a FileData dict)
        inner = upload.get("video", upload)
        return inner.get("path") if isinstance(inner, dict) else inner
    return str(upload)


def _sweep(folder: Path, ttl_s: float) -> None:
    cutoff = time.time() - ttl_s
    for p in folder.glob("*"):
        try:
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink()
        except OSError:
            pass


@dataclass
class DemoCallbacks:
    """The page's callbacks: thin adapters from component values to the tab functions."""

    predictors: Mapping[str, Predictor]
    out_dir: Path
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_video_side: int = DEFAULT_MAX_VIDEO_SIDE
    video_batch_size: int = 8
    known_labels: KnownLabels = field(default_factory=KnownLabels)

    @property
    def names(self) -> list[str]:
        return list(self.predictors)

    def pick(self, name: str | None) -> Predictor:
        try:
            return self.predictors[name or self.names[0]]
        except KeyError:
            raise gr.Error(f"unknown model {name!r}; loaded: {self.names}") from None

    @_user_errors
    def on_image(self, upload: Any, alpha: float, model: str | None) -> tuple:
        if upload is None:  # the input was cleared: clear the outputs too, quietly
            return None, None, None, "", None
        predictor = self.pick(model)
        result = segment_image(predictor, read_image_upload(upload), alpha)
        return (
            result.overlay,
            result.colour_map,
            legend_view(result.legend),
            result.timing_text(predictor),
            result.prediction,
        )

    @_user_errors
    def on_opacity(self, prediction: Prediction | None, alpha: float) -> Any:
        return gr.skip() if prediction is None else prediction.overlay(float(alpha))

    @_user_errors
    def on_video(self, upload: Any, alpha: float, model: str | None, progress: gr.Progress = gr.Progress()) -> tuple:
        path = _video_path(upload)
        if path is None:
            return None, "", None, None
        _sweep(self.out_dir, OUTPUT_TTL_S)
        progress(0.0, desc="reading video")
        result = process_video(
            self.pick(model),
            path,
            alpha=alpha,
            max_frames=self.max_video_frames,
            max_side=self.max_video_side,
            batch_size=self.video_batch_size,
            out_dir=self.out_dir,
            progress=lambda frac, msg: progress(frac, desc=msg),
        )
        notice = "\n".join(f"- {line}" for line in result.notices)
        return str(result.path), notice, result.shares, legend_view(result.legend)

    @_user_errors
    def on_compare(self, upload: Any, style: str, strength: float, model_a: str | None, model_b: str | None) -> tuple:
        if upload is None:
            return None, None, None, None, None, None, ""
        chosen = {m: self.pick(m) for m in (model_a or self.names[0], model_b) if m and m != NO_MODEL}
        image = read_image_upload(upload)
        result = compare_style(chosen, image, style, strength, labels=self.known_labels.find(image))
        a = result.models[0]
        b = result.models[1] if len(result.models) > 1 else None
        return (
            result.shifted,
            a.clean.colorized(),
            a.shifted.colorized(),
            b.clean.colorized() if b else None,
            b.shifted.colorized() if b else None,
            result.table(),
            result.summary(),
        )


def _model_dropdown(names: list[str], label: str = "Model", value: str | None = None) -> gr.Dropdown:
    return gr.Dropdown(names, value=value or names[0], label=label, visible=len(names) > 1)


def _examples(paths: Sequence[str], target: Any, label: str, api_name: str) -> None:
    if paths:
        gr.Examples([[p] for p in paths], inputs=[target], label=label, api_name=api_name)


def _image_tab(cb: DemoCallbacks, examples: Sequence[str], first_example: str | None, img0: tuple) -> None:
    """Upload -> overlay, label map, legend and timing; the opacity slider re-blends the last prediction."""
    with gr.Row():
        with gr.Column(scale=1):
            img_in = gr.Image(
                value=first_example,
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                label="Driving image",
            )
            img_model = _model_dropdown(cb.names)
            img_alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            img_btn = gr.Button("Segment", variant="primary")
            _examples(examples, img_in, "Examples (synthetic scenes)", "load_image_example")
        with gr.Column(scale=2):
            img_overlay = gr.Image(img0[0], label="Overlay", format="png", interactive=False)
            with gr.Row():
                img_labels = gr.Image(img0[1], label="Label map", format="png", interactive=False)
                with gr.Column():
                    img_time = gr.Markdown(img0[3], label="Timing")
                    img_legend = gr.Dataframe(
                        img0[2],
                        label="Classes present",
                        interactive=False,
                        elem_classes=["bn-legend"],
                        column_widths=LEGEND_WIDTHS,
                    )
    img_state = gr.State(img0[4])
    gr.on(
        [img_btn.click, img_in.change, img_model.change],
        cb.on_image,
        inputs=[img_in, img_alpha, img_model],
        outputs=[img_overlay, img_labels, img_legend, img_time, img_state],
        api_name="segment_image",
        **COMMON_EVENT,
    )
    img_alpha.release(
        cb.on_opacity,
        inputs=[img_state, img_alpha],
        outputs=[img_overlay],
        api_name="set_overlay_opacity",
        api_visibility="undocumented",  # needs the session's last prediction; useless to API clients
        show_progress="hidden",
    )


def _video_tab(cb: DemoCallbacks, video_examples: Sequence[str], colours: dict[str, str]) -> None:
    """Upload a video -> overlay video, notices, class shares over time and their mean."""
    with gr.Row():
        with gr.Column(scale=1):
            vid_in = gr.Video(sources=["upload"], label="Driving video (mp4 / avi / mov)")
            vid_model = _model_dropdown(cb.names)
            vid_alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            vid_btn = gr.Button("Segment video", variant="primary")
            gr.Markdown(
                f"At most {cb.max_video_frames} frames are processed (longer videos are subsampled) and "
                f"frames are downscaled to {cb.max_video_side} px on their longer side."
            )
            _examples(video_examples, vid_in, "Examples", "load_video_example")
        with gr.Column(scale=2):
            vid_out = gr.Video(label="Overlay video", interactive=False, autoplay=True, loop=True)
            vid_notice = gr.Markdown(label="Notice")
            vid_plot = gr.LinePlot(
                x="time_s",
                y="share_pct",
                color="class",
                color_map=colours,
                x_title="time (s)",
                y_title="pixels (%)",
                label="Class shares over time",
            )
            vid_legend = gr.Dataframe(
                label="Mean class shares", interactive=False, elem_classes=["bn-legend"], column_widths=LEGEND_WIDTHS
            )
    gr.on(
        [vid_btn.click, vid_in.change],
        cb.on_video,
        inputs=[vid_in, vid_alpha, vid_model],
        outputs=[vid_out, vid_notice, vid_plot, vid_legend],
        api_name="segment_video",
        **COMMON_EVENT,
    )


def _robustness_tab(cb: DemoCallbacks, examples: Sequence[str], first_example: str | None, rb0: tuple) -> None:
    """A style shift (night, fog, rain, ...) of one image, segmented by one or two models, with agreement."""
    names = cb.names
    many = len(names) > 1
    with gr.Row():
        with gr.Column(scale=1):
            rb_in = gr.Image(
                value=first_example,
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                label="Clean image",
            )
            rb_style = gr.Radio(list(STYLES), value="night", label="Style shift")
            rb_strength = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Strength")
            with gr.Row():
                rb_a = _model_dropdown(names, "Model A")
                rb_b = gr.Dropdown(
                    [NO_MODEL, *names], value=names[1] if many else NO_MODEL, label="Model B", visible=many
                )
            rb_btn = gr.Button("Compare", variant="primary")
            _examples(examples, rb_in, "Examples", "load_robustness_example")
        with gr.Column(scale=2):
            rb_shifted = gr.Image(rb0[0], label="Shifted image", format="png", interactive=False)
            rb_summary = gr.Markdown(rb0[6], label="Summary")
            with gr.Row():
                rb_a_clean = gr.Image(rb0[1], label="Model A: clean", format="png", interactive=False)
                rb_a_shift = gr.Image(rb0[2], label="Model A: shifted", format="png", interactive=False)
            with gr.Row(visible=many):
                rb_b_clean = gr.Image(rb0[3], label="Model B: clean", format="png", interactive=False)
                rb_b_shift = gr.Image(rb0[4], label="Model B: shifted", format="png", interactive=False)
            rb_table = gr.Dataframe(rb0[5], label="Agreement", interactive=False)
            gr.Markdown(READING_GUIDE)
    gr.on(
        [rb_btn.click, rb_in.change, rb_style.change, rb_strength.release, rb_a.change, rb_b.change],
        cb.on_compare,
        inputs=[rb_in, rb_style, rb_strength, rb_a, rb_b],
        outputs=[rb_shifted, rb_a_clean, rb_a_shift, rb_b_clean, rb_b_shift, rb_table, rb_summary],
        api_name="compare_styles",
        **COMMON_EVENT,
    )


def _output_dir(output_dir: str | Path | None) -> Path:
    if output_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="blindnet-demo-"))
        atexit.register(shutil.rmtree, out_dir, True)
        return out_dir
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def build_demo(
    predictors: Mapping[str, Predictor],
    *,
    examples: Sequence[str | Path] | None = None,
    video_examples: Sequence[str | Path] | None = None,
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
    max_video_side: int = DEFAULT_MAX_VIDEO_SIDE,
    video_batch_size: int = 8,
    output_dir: str | Path | None = None,
    prefill: bool = True,
    selected_tab: str = "image",
    title: str = "BlindNet road-scene segmentation",
) -> gr.Blocks:
    """Build the demo app (not launched; see :func:`launch`).

    Args:
        predictors: model name -> :class:`Predictor`, in display order. With two or more, the Robustness tab compares
            the first two by default.
        examples: example image paths (default: ``demo/examples/*.png``).
        video_examples: example video paths (default: ``demo/examples/*.mp4|*.webm``).
        max_video_frames: the most frames one video run processes (longer videos are subsampled, with a notice).
        max_video_side: frames with a longer side are downscaled before inference.
        video_batch_size: frames per predictor call in the Video tab (bounds memory).
        output_dir: where overlay videos are written (a temp folder removed at exit when None).
        prefill: when examples exist, open the page with the first example already segmented in the Image and
            Robustness tabs (computed once here, so a visitor sees what the app does before uploading anything).
        selected_tab: ``image``, ``video`` or ``robustness``: the tab shown first.
        title: page title.

    Endpoints (``api_name``): ``/segment_image``, ``/set_overlay_opacity``, ``/segment_video``, ``/compare_styles``.
    """
    if not predictors:
        raise ValueError("build_demo needs at least one predictor")
    if max_video_frames < 1:
        raise ValueError(f"max_video_frames must be >= 1, got {max_video_frames}")
    image_files = [str(p) for p in (default_examples() if examples is None else examples)]
    cb = DemoCallbacks(
        predictors,
        _output_dir(output_dir),
        max_video_frames,
        max_video_side,
        video_batch_size,
        KnownLabels(image_files),
    )
    names, first = cb.names, cb.names[0]
    video_files = [str(p) for p in (default_video_examples() if video_examples is None else video_examples)]
    img0: tuple = (None, None, None, "", None)
    rb0: tuple = (None,) * 6 + ("",)
    first_example = image_files[0] if prefill and image_files else None
    if first_example is not None:
        for predictor in predictors.values():  # the first call pays one-time setup; keep it out of the shown time
            predictor.predict_one(np.zeros((64, 128, 3), np.uint8))
        img0 = cb.on_image(first_example, 0.5, first)
        rb0 = cb.on_compare(first_example, "night", 0.8, first, names[1] if len(names) > 1 else NO_MODEL)

    with gr.Blocks(title=title, delete_cache=(1800, 3600), analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {title}\n"
            "Semantic segmentation of driving scenes into the 19 Cityscapes classes. "
            "BlindNet trains a model to ignore image *style* (weather, lighting, colour); the Robustness tab measures "
            "how far a model does, and compares two.\n\n"
            + "\n".join(f"- {describe_predictor(n, p)}" for n, p in predictors.items()),
            elem_id="bn-header",
        )
        with gr.Tabs(selected=selected_tab):
            with gr.Tab("Image", id="image"):
                _image_tab(cb, image_files, first_example, img0)
            with gr.Tab("Video", id="video"):
                _video_tab(cb, video_files, class_colours(predictors[first].num_classes))
            with gr.Tab("Robustness", id="robustness"):
                _robustness_tab(cb, image_files, first_example, rb0)
    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Look-and-feel arguments that Gradio 6 takes at ``launch()`` (no longer at ``Blocks()``)."""
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css": CSS}


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    max_file_size: str = "200mb",
    **kwargs: Any,
) -> Any:
    """Launch ``demo`` on loopback by default; exposing it (``host="0.0.0.0"``, ``share=True``) is opt-in.

    ``show_error`` is on: an unexpected failure reaches the client as its message (the server logs the traceback),
    not as an opaque "Error". Gradio's own startup lines are replaced by ours, which name the ``--share`` flag of
    ``blindnet demo`` instead of ``launch(share=True)``. Blocks unless ``prevent_thread_lock=True`` is passed.
    """
    block = not kwargs.pop("prevent_thread_lock", False)
    quiet = kwargs.pop("quiet", False)
    result = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=max_file_size,
        show_error=True,
        quiet=True,
        prevent_thread_lock=True,
        **{**launch_kwargs(), **kwargs},
    )
    if not quiet:
        print(startup_message(demo.local_url, demo.share_url), flush=True)
    if block:
        demo.block_thread()
    return result


def startup_message(local_url: str | None, share_url: str | None) -> str:
    """The lines ``blindnet demo`` prints once it listens."""
    public = f"Public link: {share_url}" if share_url else "For a public gradio.live link, run again with --share."
    return f"Running on {local_url}\n{public}"
