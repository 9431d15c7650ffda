// The reference ttrpc (containerd's Go implementation, Debian's package) against
// vmfactory's: "client PATH" calls a Python server, "server PATH" serves one.
package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/status"
)

func client(path string) error {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var resp types.BytesValue
	if err := c.Call(ctx, "test.v1.Echo", "Echo", &types.BytesValue{Value: []byte("hello")}, &resp); err != nil {
		return err
	}
	fmt.Printf("echo %s\n", resp.Value)
	err = c.Call(ctx, "test.v1.Echo", "Fail", &types.BytesValue{}, &resp)
	st, _ := status.FromError(err)
	fmt.Printf("fail %d %s\n", st.Code(), st.Message())
	err = c.Call(ctx, "test.v1.Echo", "Missing", &types.BytesValue{}, &resp)
	st, _ = status.FromError(err)
	fmt.Printf("missing %d\n", st.Code())
	return nil
}

func server(path string) error {
	s, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	s.Register("test.v1.Go", map[string]ttrpc.Method{
		"Upper": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.BytesValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &types.BytesValue{Value: bytes.ToUpper(req.Value)}, nil
		},
	})
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	return s.Serve(context.Background(), l)
}

func main() {
	var err error
	if os.Args[1] == "client" {
		err = client(os.Args[2])
	} else {
		err = server(os.Args[2])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
