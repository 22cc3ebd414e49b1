from cloud_aggregator.web import main

raise SystemExit(main())
