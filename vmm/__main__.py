from vmigrate.vmm.server import main

main()
