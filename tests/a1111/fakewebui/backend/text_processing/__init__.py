"""Stand-in package (Forge ``backend/text_processing``): the T5 engine of Flux."""
