"""The simulated study behind the embedded default (data_recipes/toyworld.py).

- `scenes`: scene sampling (`sample_scene`, `choose_held_out_pairs`) and rendering (`render_scene`)
- `captions`: the caption grammar (`describe`, `canonical_caption`, `vocabulary`)
- `brain`: subject anatomy, the nonlinear voxel encoding model, noise and the noise ceiling
- `nsd_layout`: writers of the NSD release files; `study`: `build_study`, which ties it together

Scenes and captions import nothing heavy, so a text-to-image trainer can use them on their own:

    from mindsemantix.simulate.scenes import sample_scene, render_scene
    from mindsemantix.simulate.captions import describe, canonical_caption
"""

from .captions import canonical_caption, describe, vocabulary
from .scenes import Scene, SceneObject, choose_held_out_pairs, render_scene, render_scenes, sample_scene

__all__ = ["Scene", "SceneObject", "canonical_caption", "choose_held_out_pairs", "describe", "render_scene",
           "render_scenes", "sample_scene", "vocabulary"]
