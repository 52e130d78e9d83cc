"""The procedurally generated toy world (docs/method.md, "The toy world"): scenes, videos and pages with ground truth.

``scenes`` holds the primitives and rendering, ``tasks`` the MMEB-V2-shaped datasets (easy and hard items),
``skills`` the atomic single steps, ``build`` writes datasets to disk in the real MMEB schemas.
"""

from .scenes import Obj, Page, Scene, Video, render_object, render_page, render_scene
from .tasks import DATASETS, Item, make_item

__all__ = ["DATASETS", "Item", "Obj", "Page", "Scene", "Video", "make_item", "render_object", "render_page",
           "render_scene"]
