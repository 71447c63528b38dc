from onnxstack.cli import main

main()
