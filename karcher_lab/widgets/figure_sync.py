"""Bringing a live plotly FigureWidget to the state of a freshly built figure, in place.

The panels build each figure with an ordinary function (:mod:`karcher_lab.plots`,
:mod:`karcher_lab.widgets.figures`) and then copy it into the FigureWidget the notebook already shows:
traces are updated where they exist, added or dropped at the end, and the layout is overwritten, all
inside one ``batch_update`` (one message to the browser, no re-created figure, no flicker).
"""
from __future__ import annotations

import plotly.graph_objects as go


def sync_figure(widget: go.FigureWidget, figure: go.Figure, **layout) -> None:
    """Make ``widget`` show ``figure``: trace i of the widget takes trace i's properties (a trace of
    another type is replaced), surplus widget traces are removed, missing ones appended, and the layout
    is replaced (then ``layout`` keywords, e.g. a size, are applied). The widget object, its DOM
    classes and its view stay the same."""
    specs = [trace.to_plotly_json() for trace in figure.data]
    keep = 0
    while keep < min(len(widget.data), len(specs)) and widget.data[keep].type == specs[keep]["type"]:
        keep += 1
    if len(widget.data) > keep:
        widget.data = widget.data[:keep]
    with widget.batch_update():
        for trace, spec in zip(widget.data, specs):
            spec = {k: v for k, v in spec.items() if k not in ("type", "uid")}
            trace.update(spec, overwrite=True)
        for spec in specs[keep:]:
            widget.add_trace(spec)
        widget.layout.update(figure.layout.to_plotly_json(), overwrite=True)
        widget.layout.update(layout)
