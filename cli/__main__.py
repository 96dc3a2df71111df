from ddk_cache.cli.main import main

main()
