from .train_head import main

main()
