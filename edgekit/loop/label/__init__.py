"""The labeling page: ``edgekit label`` serves it (see docs/labeling.md).

* :class:`LabelService`: queue, leases, version-checked saves, undo, grid, progress (no HTTP);
* :class:`LabelServer`: the page and its JSON API on the standard library's HTTP server;
* :mod:`.render`: a stored input as a PNG or a plot.
"""

from .server import LabelServer
from .service import LabelService

__all__ = ["LabelServer", "LabelService"]
