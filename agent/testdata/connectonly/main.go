// Command connectonly only connects to the local node: TestConnectOnlyIsSmall
// builds it to hold the size of a program that uses package agent.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/granary-build/granary/agent"
)

func main() {
	c, err := agent.Connect(context.Background(), os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	c.Close()
}
