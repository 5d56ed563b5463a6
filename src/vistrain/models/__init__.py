"""Models: timm backbone + head; losses."""
