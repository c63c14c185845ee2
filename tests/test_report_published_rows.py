"""eval.md prints a published NSD number only beside a metric this report computed the same way."""

from __future__ import annotations

from mindsemantix.eval import report as R


def image_anchors_section(tmp_path, metrics: dict[str, float]) -> str:
    evaluation = {"metrics": metrics, "baselines": {}, "ceiling": {}, "anchors_nsd": R.ANCHORS_NSD, "versions": {}}
    md = (R.write_report(tmp_path, evaluation)["eval.md"]).read_text()
    section = md.split("## Published numbers on NSD")[1].split("## Pictures")[0]
    return section[section.index("NSD, images"):]


def test_published_image_numbers_only_beside_metrics_computed_the_same_way(tmp_path):
    # the demo's nets: 2-way with EfficientNet-Lite0, not MindEye2's Inception / CLIP
    ours = image_anchors_section(tmp_path / "a", {"PixCorr": 0.4, "SSIM": 0.8, "TwoWay-EfficientNetLite0": 0.6})
    assert "PixCorr" in ours and ".322" in ours                          # same definition: shown
    assert "0.954" not in ours and ".954" not in ours and "| TwoWay-InceptionV3 |" not in ours
    assert "not computed the same way here" in ours and "TwoWay-InceptionV3" in ours  # said, not printed
    assert ".619" not in ours                                          # EffNet-B distance: never beside a 2-way
    # with the published nets (given by path on NSD), their numbers appear
    same = image_anchors_section(tmp_path / "b", {"PixCorr": 0.4, "SSIM": 0.8, "TwoWay-InceptionV3": 0.7,
                                                  "TwoWay-CLIP": 0.7})
    assert ".954" in same and ".930" in same
    nothing = image_anchors_section(tmp_path / "c", {"TwoWay-EfficientNetLite0": 0.6})
    assert "no published number is shown" in nothing and ".322" not in nothing
