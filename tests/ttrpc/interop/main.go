// The reference ttrpc (containerd's Go implementation, Debian's package) against
// vmfactory's: "client PATH" calls a Python server, "server PATH" serves one, and
// "agent PATH SERVICE METHOD HEX" calls a vmfactory guest agent's unary RPC with a
// request given as hex-encoded protobuf bytes, printing the reply the same way.
package main

import (
	"bytes"
	"context"
	"encoding/hex"
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

// raw is a protobuf message whose encoding the caller built: the agent's types
// need no generated Go code.
type raw struct{ b []byte }

func (r *raw) Reset()                   { r.b = nil }
func (r *raw) String() string           { return hex.EncodeToString(r.b) }
func (*raw) ProtoMessage()              {}
func (r *raw) Marshal() ([]byte, error) { return r.b, nil }
func (r *raw) Unmarshal(b []byte) error { r.b = append([]byte(nil), b...); return nil }

func agent(path, service, method, request string) error {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	payload, err := hex.DecodeString(request)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var resp raw
	if err := c.Call(ctx, service, method, &raw{payload}, &resp); err != nil {
		st, _ := status.FromError(err)
		fmt.Printf("error %d %s\n", st.Code(), st.Message())
		return nil
	}
	fmt.Printf("reply %s\n", hex.EncodeToString(resp.b))
	return nil
}

func main() {
	var err error
	switch os.Args[1] {
	case "client":
		err = client(os.Args[2])
	case "agent":
		err = agent(os.Args[2], os.Args[3], os.Args[4], os.Args[5])
	default:
		err = server(os.Args[2])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
