"""Protocol definitions (.proto) and their generated Python modules.

The generated ``*_pb2.py`` / ``*_pb2_grpc.py`` files are not committed: they are
built by ``python -m vmfactory.proto.gen`` (run by ``./dev setup``) and shipped
into the guest image by the image builder.
"""
