"""Caption text: the post-processing chain, VLM output cleaning, tag facts."""
