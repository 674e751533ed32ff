from services.prefill.worker import main

main()
