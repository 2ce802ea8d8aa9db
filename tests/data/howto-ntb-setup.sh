# Documentation/PCI/endpoint/pci-ntb-howto.rst (Linux 7.3), its commands in order.  The
# howto's two ln lines say functions/pci-epf-ntb/; configfs names the directory
# pci_epf_ntb, as every other line does, so they are written that way here.
mount -t configfs none /sys/kernel/config
cd /sys/kernel/config/pci_ep/
mkdir functions/pci_epf_ntb/func1
echo 0x104c > functions/pci_epf_ntb/func1/vendorid
echo 0xb00d > functions/pci_epf_ntb/func1/deviceid
echo 4 > functions/pci_epf_ntb/func1/pci_epf_ntb.0/db_count
echo 128 > functions/pci_epf_ntb/func1/pci_epf_ntb.0/spad_count
echo 2 > functions/pci_epf_ntb/func1/pci_epf_ntb.0/num_mws
echo 0x100000 > functions/pci_epf_ntb/func1/pci_epf_ntb.0/mw1
echo 0x100000 > functions/pci_epf_ntb/func1/pci_epf_ntb.0/mw2
ln -s controllers/2900000.pcie-ep/ functions/pci_epf_ntb/func1/primary
ln -s controllers/2910000.pcie-ep/ functions/pci_epf_ntb/func1/secondary
echo 1 > controllers/2900000.pcie-ep/start
echo 1 > controllers/2910000.pcie-ep/start
