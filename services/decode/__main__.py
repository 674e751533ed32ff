from services.decode.worker import main

main()
