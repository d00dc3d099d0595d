//go:build !linux

package peers

import "syscall"

func childAttr() *syscall.SysProcAttr { return nil }

func liftChildNofile() {}
