"""The editing engine: DDIM loop, chunk schedule, memory estimate, inversion cache, methods, controls."""
