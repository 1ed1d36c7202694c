from service.worker.runtime import main

main()
