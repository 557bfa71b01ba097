"""``python -m ppo.bench``."""

from ppo.bench import main

main()
