"""Output monitoring: recommendations compared with a reference (`recsys-cvae monitor`)."""
