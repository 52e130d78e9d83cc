"""The procedurally generated toy world (docs/method.md, "The toy world"): scenes, videos and pages with ground truth.

``scenes`` holds the primitives and rendering, ``tasks`` the MMEB-V2-shaped datasets (easy and hard items),
``skills`` the atomic single steps, ``chains`` the multi-hop chains of hard items, ``build`` writes datasets to disk
in the real MMEB schemas, ``audit`` checks that no surface marker tells hard from easy.

May import: ``data`` and ``runs`` (``build`` writes the MMEB schemas and refuses a folder made from other settings).
Nothing of the model or the method: the world is the ground truth they are measured against.
"""

from .scenes import Obj, Page, Scene, Video, render_object, render_page, render_scene
from .tasks import DATASETS, Item, make_item

__all__ = ["DATASETS", "Item", "Obj", "Page", "Scene", "Video", "make_item", "render_object", "render_page",
           "render_scene"]
