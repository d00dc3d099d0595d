package tpm

import "fmt"

// DisablePlatformHierarchy closes the platform hierarchy, as a real TPM's
// firmware does at boot (tests only): TPM2_HierarchyControl(platform,
// enable=platform, state=NO), written out as go-tpm has no such command.
func (d *Device) DisablePlatformHierarchy() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cmd := []byte{0x80, 0x02, 0, 0, 0, 32, 0, 0, 0x01, 0x21, 0x40, 0, 0, 0x0c,
		0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0x01, 0, 0,
		0x40, 0, 0, 0x0c, 0}
	rsp, err := d.t.Send(cmd)
	if err != nil {
		return err
	}
	if len(rsp) < 10 || rsp[6]|rsp[7]|rsp[8]|rsp[9] != 0 {
		return fmt.Errorf("HierarchyControl refused: % x", rsp)
	}
	return nil
}
