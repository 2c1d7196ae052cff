"""Motion beyond the mouth: ``idle`` (blinks, head sway, breathing) over every frame."""
