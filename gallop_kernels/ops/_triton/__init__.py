"""What the Triton launchers of every op share: launch descriptions, launch tables, the compile gate."""
