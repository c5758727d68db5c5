from gallop_kernels.finetune.cli import main

raise SystemExit(main())
