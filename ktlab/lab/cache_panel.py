"""The dashboard's prefix-cache panel: tier sizes and page size, a multi-turn chat run in the background,
and a plot of hits per tier and prompt tokens served from the cache (all measured).

It only calls :meth:`ktlab.lab.session.Session.chat_cache`; the Session owns the model and the engine.
"""

from __future__ import annotations

import ipywidgets as w

from ktlab.lab.background import BackgroundJob, Progress
from ktlab.lab.plots import prefix_cache_figure, update_prefix_cache
from ktlab.lab.workloads import ChatCacheConfig, ChatCacheResult

PAGE_SIZES = (4, 8, 16, 32, 64)


def _mb_slider(description: str, value: float, maximum: float) -> w.FloatSlider:
    return w.FloatSlider(value=value, min=0.0, max=maximum, step=0.1, readout_format=".1f", description=description,
                         continuous_update=False, style={"description_width": "110px"})


class CachePanel:
    """GPU / RAM / disk prefix-cache sizes (MB, 0 = off), page size and the chat workload's size."""

    def __init__(self, session) -> None:
        self.session = session
        d = ChatCacheConfig()
        self.gpu_mb = _mb_slider("GPU tier MB", d.gpu_mb, 4.0)
        self.ram_mb = _mb_slider("RAM tier MB", d.ram_mb, 16.0)
        self.disk_mb = _mb_slider("disk tier MB", d.disk_mb, 64.0)
        self.page_size = w.Dropdown(options=PAGE_SIZES, value=d.page_size, description="page tokens",
                                    style={"description_width": "110px"})
        self.conversations = w.IntSlider(value=d.conversations, min=1, max=8, description="conversations",
                                         continuous_update=False, style={"description_width": "110px"})
        self.turns = w.IntSlider(value=d.turns, min=1, max=6, description="turns", continuous_update=False,
                                 style={"description_width": "110px"})
        self.figure = prefix_cache_figure()
        self.result: ChatCacheResult | None = None
        self.job = BackgroundJob("run chat", "comments", self._work, self._show,
                                 tooltip="a multi-turn chat through the engine with these prefix-cache tiers")
        self.stop_button = w.Button(description="stop", icon="stop", tooltip="stop after the current turn")
        self.stop_button.on_click(lambda _button: session.stop())
        controls = w.VBox([self.gpu_mb, self.ram_mb, self.disk_mb, self.page_size, self.conversations, self.turns,
                           w.HBox([self.job.widget, self.stop_button])])
        self.widget = w.VBox([w.HTML("<b>Prefix cache</b>: three tiers (GPU, RAM, disk) on a multi-turn chat "
                                     "with the model (measured; without CUDA the GPU tier is host memory standing "
                                     "in for it, labeled simulated)"), controls, self.figure])

    def config(self) -> ChatCacheConfig:
        """The workload and tiers the controls describe."""
        return ChatCacheConfig(gpu_mb=self.gpu_mb.value, ram_mb=self.ram_mb.value, disk_mb=self.disk_mb.value,
                               page_size=self.page_size.value, conversations=self.conversations.value,
                               turns=self.turns.value)

    def _work(self, progress: Progress) -> ChatCacheResult:
        return self.session.chat_cache(self.config(), progress)

    def _show(self, result: ChatCacheResult) -> str:
        self.result = result
        update_prefix_cache(self.figure, result)
        hits = ", ".join(f"{name} {n}" for name, n in result.hits.items()) or "cache off"
        stopped = " (stopped early)" if not result.completed else ""
        return (f"{result.saved_tokens} prompt tokens served from the cache in {result.seconds:.1f} s; "
                f"page hits: {hits}{stopped}")
