"""Transport adapters over the daemon core: thin, convert and delegate."""
