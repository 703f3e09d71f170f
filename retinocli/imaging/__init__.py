"""From a file to the pixels a model sees: decode, fundus crop, Graham, resize; the prepare cache. No torch."""
