"""The latent explorer's weights file (chapter 8): what export_explorer_weights writes
for the browser, read back. The page itself is tested in test_website.py."""

import base64
import json

import torch

import vae_helpers as vh


def test_exported_weights_are_the_checkpoints_and_the_page_gets_its_data(
    config, small_data, tmp_path
):
    tiny = {"epochs": 1, "output_dir": str(tmp_path)}
    config_32 = {**config, **tiny}
    config_2d = {**config, **tiny, "latent_dim": 2, "beta": 2.0}
    path = tmp_path / "explorer" / "weights.js"
    size = vh.export_explorer_weights(config_32, config_2d, path, data=small_data)
    text = path.read_text()
    assert size == len(text) and text.startswith(vh.EXPLORER_PREFIX)

    exported = vh.read_explorer_weights(path)
    for name, model_config in [("latent32", config_32), ("latent2", config_2d)]:
        checkpoint = vh.load_checkpoint(vh.checkpoint_path(model_config))["model"]
        assert exported[name].keys() == checkpoint.keys()
        assert all(torch.equal(exported[name][k], v) for k, v in checkpoint.items())

    page = json.loads(text.removeprefix(vh.EXPLORER_PREFIX).rstrip().rstrip(";"))
    tests = len(small_data["test"][0])
    assert len(base64.b64decode(page["map"]["codes"])) == 4 * 2 * tests
    assert len(base64.b64decode(page["map"]["labels"])) == tests
    assert len(base64.b64decode(page["principal"]["directions"])) == 4 * 8 * 32
    assert page["principal"]["std"] == sorted(page["principal"]["std"], reverse=True)
    assert sorted(page["digits"]["labels"]) == [d for d in range(10) for _ in range(3)]
    images = base64.b64decode(page["digits"]["images"])
    first = page["digits"]["index"][0]
    original = vh.denormalize(small_data["test"][0][first : first + 1]) * 255
    assert list(images[:784]) == original.round().flatten().int().tolist()
