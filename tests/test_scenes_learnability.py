"""Every colour, shape and texture is recognisable from pixels at the default resolution.

A small convolutional probe is trained on objects rendered exactly as they appear in scenes
(the renderer's sprites, at random orientations and perspective scales, on the lit floor) and
must tell apart the 10 values of each dimension on held-out renders.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from metacl.scenes.render import SceneRenderer

CROP = 48


def render_objects(renderer: SceneRenderer, count: int, seed: int):
    """(count, 3, CROP, CROP) renders of random objects centred in the crop, and their labels."""
    g = torch.Generator().manual_seed(seed)
    colour, shape, texture = (torch.randint(0, 10, (count,), generator=g) for _ in range(3))
    rotation = torch.randint(0, renderer.rotations, (count,), generator=g)
    scale = 0.85 + 0.4 * torch.rand(count, generator=g)
    sprites = renderer.sprite_table[(shape * renderer.rotations + rotation) * renderer.textures + texture]
    bounds = torch.as_tensor(renderer.sprite_bounds, dtype=torch.float32)[shape]
    centre = torch.stack([(bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2], -1)
    offsets = torch.arange(CROP) + 0.5 - CROP / 2
    sx = (offsets[None] / scale[:, None] + centre[:, :1] + renderer.anchor[0]) / renderer.sprite_w * 2 - 1
    sy = (offsets[None] / scale[:, None] + centre[:, 1:] + renderer.anchor[1]) / renderer.sprite_h * 2 - 1
    grid = torch.stack([sx[:, None, :].expand(-1, CROP, -1), sy[:, :, None].expand(-1, -1, CROP)], -1)
    alpha, tint, white = F.grid_sample(sprites, grid, align_corners=False).unbind(1)
    floor = renderer.atlas.ground[:, :CROP, :CROP][None]
    rgb = floor * (1 - alpha[:, None]) + renderer.colours[colour][..., None, None] * tint[:, None] + white[:, None]
    images = (rgb.clamp(0, 1) * 255).round() / 255
    return images, torch.stack([colour, shape, texture], 1)


def probe() -> nn.Module:
    """Three conv blocks at full crop resolution (patterns are a few pixels wide) and a linear head."""

    def block(inputs, outputs):
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 6 * 6, 30))


def test_probe_tells_apart_every_colour_shape_and_texture():
    torch.manual_seed(0)
    renderer = SceneRenderer(120, 160)
    train_x, train_y = render_objects(renderer, 3000, seed=1)
    test_x, test_y = render_objects(renderer, 1000, seed=2)
    net = probe()
    epochs, batch_size = 8, 100
    optimiser = torch.optim.Adam(net.parameters(), 3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 6e-3, total_steps=epochs * len(train_x) // batch_size)
    order = torch.Generator().manual_seed(3)
    for _epoch in range(epochs):
        for batch in torch.randperm(len(train_x), generator=order).split(batch_size):
            logits = net(train_x[batch]).view(-1, 3, 10)
            loss = F.cross_entropy(logits.permute(0, 2, 1), train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(test_x).view(-1, 3, 10).argmax(-1) == test_y).float().mean(0)
    print("held-out accuracy (colour, shape, texture):", accuracy.tolist())
    assert (accuracy >= 0.9).all(), accuracy.tolist()
